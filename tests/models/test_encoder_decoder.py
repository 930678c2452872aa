"""Encoder-decoder models (tiny random T5 and BART): prefix shapes, PEFT equality, save/load, warm start, sampling, PPO."""
import importlib.metadata
import json

import pytest
import torch
import transformers
import yaml
from packaging.version import Version

import rlprefix
from rlprefix.decoding import engine
from rlprefix.decoding.bank import PrefixBank
from rlprefix.models import encoder_decoder as seq2seq
from rlprefix.prefixes.artifacts import ModelMismatchError
from rlprefix.train.data import collate_sft, load_records, tokenize_sft
from rlprefix.models.adapter import score_completions
from rlprefix.train.warm_start import evaluate_loss
from rlprefix.prefixes.peft import export_peft, load_peft_kv
from rlprefix.models import prefix_kv
from tiny import tiny_model, tiny_tokenizer, peft_calls

SOURCES = ["hello world", "The film was wonderful and the actors were great.", "positive review"]


@pytest.fixture(params=["t5", "bart"])
def s2s(request):
    return tiny_model(request.param, sharpen=3.0)


@pytest.fixture
def tok():
    return tiny_tokenizer(chat=False)


def kv_prefix(model, length=4, seed=0, scale=20.0):
    prefix = rlprefix.Prefix.for_model(model, length, "kv", generator=torch.Generator().manual_seed(seed))
    prefix.kv.data.mul_(scale)  # large enough to move the logits a lot
    return prefix


def sources(tok, texts=SOURCES, side="right"):
    tok.padding_side = side
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def completions(rows, width=5, seed=0):
    ids = torch.randint(5, 300, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # a row that ended early
    return ids, mask


def test_spec_from_config():
    t5 = rlprefix.kv_spec(tiny_model("t5"))
    assert (t5.encoder_decoder, t5.num_layers, t5.num_kv_heads, t5.head_dim, t5.kv_dim) == (True, 3, 4, 6, 24)
    bart = rlprefix.kv_spec(tiny_model("bart"))
    assert (bart.encoder_decoder, bart.num_layers, bart.num_kv_heads, bart.head_dim) == (True, 2, 4, 8)
    assert t5.describe().startswith("t5 (encoder-decoder): 3 decoder layers")
    assert seq2seq.peft_slots(3) == [0, 2, 1] and seq2seq.peft_slots(4) == [0, 2, 0, 2]


def test_decoder_only_fingerprint_unchanged():
    """The new spec field is left out for decoder-only models: their fingerprints (and saved prefixes) stay valid."""
    spec = rlprefix.kv_spec(tiny_model("llama"))
    assert "encoder_decoder" not in spec.as_dict()
    assert spec.fingerprint() == "c83d68f291d18305"


def test_prefix_changes_logits_and_gradients_flow(s2s, tok):
    ids, mask = sources(tok)
    comp, cmask = completions(len(SOURCES))
    prefix = rlprefix.Prefix.for_model(s2s, 4, "mlp", mlp_hidden=16, generator=torch.Generator().manual_seed(0))
    with_p = seq2seq.score_completions(s2s, ids, mask, comp, cmask, prefix)
    without = seq2seq.score_completions(s2s, ids, mask, comp, cmask, None)
    assert with_p.logprobs.shape == (len(SOURCES), 5)
    assert (with_p.logprobs - without.logprobs).abs().max() > 1e-3
    (with_p.logprobs * cmask).sum().backward()
    assert prefix.p_theta.grad is not None and prefix.p_theta.grad.abs().sum() > 0


def test_source_padding_side_does_not_matter(s2s, tok):
    comp, cmask = completions(len(SOURCES))
    prefix = kv_prefix(s2s)
    right = seq2seq.score_completions(s2s, *sources(tok, side="right"), comp, cmask, prefix).logprobs
    left = seq2seq.score_completions(s2s, *sources(tok, side="left"), comp, cmask, prefix).logprobs
    alone = seq2seq.score_completions(s2s, *sources(tok, SOURCES[:1]), comp[:1], cmask[:1], prefix).logprobs
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose((right[:1] - alone) * cmask[:1], torch.zeros_like(alone), atol=1e-5)


@peft_calls
def test_peft_export_gives_identical_logits(s2s, tok, tmp_path):
    peft = pytest.importorskip("peft")
    prefix = kv_prefix(s2s)
    export_peft(prefix, s2s, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["num_transformer_submodules"] == 2
    ids, mask = sources(tok)
    comp, cmask = completions(len(SOURCES))
    ours = seq2seq.score_completions(s2s, ids, mask, comp, cmask, prefix).logits
    pm = peft.PeftModel.from_pretrained(s2s, tmp_path / "peft").eval()
    start = torch.full((len(SOURCES), 1), seq2seq.decoder_start_id(s2s))
    decoder_ids = torch.cat([start, comp[:, :-1]], 1)
    decoder_mask = torch.cat([torch.ones_like(start), cmask[:, :-1]], 1)
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                    decoder_attention_mask=decoder_mask).logits
    assert (ours - theirs).abs().max() < 1e-5
    # and the prefix matters there too (not a vacuous equality)
    base = seq2seq.score_completions(s2s, ids, mask, comp, cmask, None).logits
    assert (base - theirs).abs().max() > 1e-2
    back = load_peft_kv(tmp_path / "peft", s2s)
    assert torch.allclose(back, prefix.kv.detach(), atol=1e-6)


def check_peft_generate(model, tok, tmp_path):
    """PEFT's own generate (its prefill hook puts the prefix in) decodes the same greedy tokens as rlprefix."""
    peft = pytest.importorskip("peft")
    prefix = kv_prefix(model)
    export_peft(prefix, model, tmp_path / "peft")
    ids, mask = sources(tok)
    roll = rlprefix.reference_sample(model, tok, ids, mask, prefix, max_new_tokens=6, do_sample=False)
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=0,
                      eos_token_id=1, pad_token_id=0)
    theirs = out[:, 1:]  # drop the decoder start token
    width = min(theirs.shape[1], roll.completion_ids.shape[1])
    ours = roll.completion_ids[:, :width].masked_fill(roll.completion_mask[:, :width] == 0, 0)
    assert torch.equal(ours, theirs[:, :width].masked_fill(roll.completion_mask[:, :width] == 0, 0))


# Upstream: with transformers 5.24, PEFT 0.21's own `generate` on a T5 prefix disagrees with PEFT's own forward
# (T5 with as many encoder as decoder layers: other greedy tokens; fewer encoder layers: IndexError in
# DynamicCache.update). BART is unaffected, and rlprefix's export still gives PEFT's forward logits exactly on
# both (test_peft_export_gives_identical_logits), so these two run where PEFT's T5 generate still works.
PEFT_T5_GENERATE = pytest.mark.skipif(
    Version(transformers.__version__) >= Version("5.24") or Version(importlib.metadata.version("peft")) < Version("0.21"),
    reason="PEFT's T5 prefix generate is broken upstream: PEFT 0.21 with transformers >= 5.24 (other tokens, or "
           "IndexError in DynamicCache.update), and PEFT 0.18 with transformers 5.4 (IndexError)")


@peft_calls
@pytest.mark.parametrize("arch", [pytest.param(a, marks=PEFT_T5_GENERATE) for a in ("t5-even", "t5")] + ["bart"])
def test_peft_generate_matches_greedy_sampling(arch, tok, tmp_path):
    """"t5": fewer encoder (2) than decoder (3) layers; "t5-even": 3 and 3, like released T5 checkpoints."""
    check_peft_generate(tiny_model(arch, sharpen=3.0), tok, tmp_path)


def test_save_load_and_family_errors(s2s, tmp_path):
    prefix = kv_prefix(s2s)
    prefix.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["model"]["encoder_decoder"] is True
    loaded = rlprefix.load_prefix(tmp_path / "p", s2s)
    assert loaded.spec == prefix.spec and torch.equal(loaded.kv, prefix.kv)
    llama = tiny_model("llama")
    with pytest.raises(ModelMismatchError, match="encoder-decoder.*decoder-only"):
        rlprefix.load_prefix(tmp_path / "p", llama)
    with pytest.raises(ModelMismatchError, match="encoder-decoder model .* but the model is decoder-only"):
        prefix_kv(llama, prefix)
    decoder_only = rlprefix.Prefix.for_model(llama, 4, "kv")
    decoder_only.save(tmp_path / "d")
    with pytest.raises(ModelMismatchError, match="decoder-only.*encoder-decoder"):
        rlprefix.load_prefix(tmp_path / "d", s2s)
    with pytest.raises(ModelMismatchError, match="decoder-only model .* but the model is encoder-decoder"):
        prefix_kv(s2s, decoder_only)


def test_unsupported_kinds_are_refused(s2s, tok):
    with pytest.raises(ValueError, match="'prompt' prefix"):
        rlprefix.Prefix.for_model(s2s, 4, "prompt")
    with pytest.raises(ValueError, match="'prompt' prefix"):
        rlprefix.Prefix.from_text(s2s, tok, "hello world", kind="prompt")


# ---- text initialisation: the decoder's K/V for the text, with the neutral source (the encoder on EOS) -----------
def decoder_cache_kv(model, text_ids):
    """Per decoder layer, the self-attention cache of the decoder run on `text_ids` with the source [EOS]."""
    source = torch.tensor([[model.config.eos_token_id]])
    out = model(input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=torch.tensor([text_ids]),
                use_cache=True)
    return [torch.stack([x[0].transpose(0, 1).reshape(len(text_ids), -1) for x in (layer.keys, layer.values)])
            for layer in out.past_key_values.self_attention_cache.layers]


@pytest.mark.parametrize("kind", ["kv", "mlp", "shared"])
def test_text_init_is_the_decoders_kv_in_pefts_slots(s2s, tok, kind):
    """T5 here has 3 decoder layers (slots 0, 2, 1: each its own), BART 2 (both read slot 0, slot 1 unread)."""
    text = "positive review"
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = rlprefix.Prefix.from_text(s2s, tok, text, kind=kind)
    spec = rlprefix.kv_spec(s2s)
    assert prefix.length == len(text_ids) and prefix.init_ids == text_ids
    kv = prefix.key_values(s2s).detach()
    assert kv.shape == (spec.num_layers, 2, len(text_ids), spec.kv_dim)
    cache = decoder_cache_kv(s2s, text_ids)
    slots = seq2seq.peft_slots(spec.num_layers)
    for layer in range(spec.num_layers):
        if slots.index(slots[layer]) == layer:  # the lowest layer reading this slot owns it
            assert (kv[slots[layer]] - cache[layer]).abs().max() < 1e-5, layer
    for unread in set(range(spec.num_layers)) - set(slots):
        assert kv[unread].abs().max() == 0
    if s2s.config.model_type == "t5":
        assert sorted(slots) == [0, 1, 2]  # every layer's own K/V: nothing was skipped above


@pytest.mark.parametrize("length", [2, 7])
def test_text_init_truncates_and_tiles_like_decoder_only(s2s, tok, length):
    text = "positive review"
    once = tok(text, add_special_tokens=False)["input_ids"]
    again = tok(" " + text, add_special_tokens=False)["input_ids"]
    want = (once + again * length)[:length]
    prefix = rlprefix.Prefix.from_text(s2s, tok, text, length, kind="kv")
    assert prefix.length == length and prefix.init_ids == want
    assert torch.allclose(prefix.kv.detach(), seq2seq.text_kv(s2s, want))


def test_text_init_acts_like_the_text_before_the_decoder_input(tok):
    """With an odd number of decoder layers (T5 here: 3) a "kv" text prefix gives exactly the logits of the text
    prepended to the decoder's input, with the neutral source."""
    t5 = tiny_model("t5", sharpen=3.0)
    text_ids = tok("positive review", add_special_tokens=False)["input_ids"]
    prefix = rlprefix.Prefix.from_text(t5, tok, "positive review", kind="kv")
    source = torch.tensor([[t5.config.eos_token_id]])
    decoder = torch.tensor([[seq2seq.decoder_start_id(t5), 17, 42, 99]])
    with_prefix = seq2seq.forward(t5, source, torch.ones_like(source), decoder, prefix=prefix).logits
    plain = t5(input_ids=source, attention_mask=torch.ones_like(source),
               decoder_input_ids=torch.cat([torch.tensor([text_ids]), decoder], 1)).logits[:, len(text_ids):]
    assert (with_prefix - plain).abs().max() < 1e-4


# ---- warm start on (source, target) pairs ---------------------------------------------------------------------
PAIRS = [{"prompt": f"review {w}", "completion": f"{w} is good great love"} for w in
         ["film", "food", "phone", "hotel", "park", "room", "staff", "actors"]]


def test_pairs_tokenise_to_source_and_decoder_target(s2s, tok):
    ds = load_records(PAIRS[:1])
    (ex,) = tokenize_sft(ds, tok, max_length=64, decoder_start=seq2seq.decoder_start_id(s2s))
    target = tok("film is good great love" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ex.source_ids == tok("review film")["input_ids"]
    assert ex.input_ids == [seq2seq.decoder_start_id(s2s)] + target and ex.labels == [-100] + target
    batch = collate_sft([ex], tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "source_ids", "source_mask"}


def test_warm_start_lowers_the_loss_and_merge_keeps_it(s2s, tok):
    prefix = rlprefix.Prefix.for_model(s2s, 6, "mlp", mlp_hidden=32, generator=torch.Generator().manual_seed(0))
    cfg = rlprefix.WarmStartConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=3, eval_every=10,
                                   eval_fraction=0.25, progress=False, merge=False)
    res = rlprefix.warm_start(s2s, tok, prefix, PAIRS, cfg)
    assert res.history[-1]["loss"] < 0.85 * res.history[0]["loss"]
    examples = tokenize_sft(load_records(PAIRS), tok, decoder_start=seq2seq.decoder_start_id(s2s))
    trained = evaluate_loss(s2s, res.prefix, examples, tok.pad_token_id)
    assert evaluate_loss(s2s, res.prefix.merge(), examples, tok.pad_token_id) == pytest.approx(trained, abs=1e-5)
    assert trained < evaluate_loss(s2s, None, examples, tok.pad_token_id)


# ---- sampling ---------------------------------------------------------------------------------------------------
def test_sampled_logprobs_equal_a_forward_pass(s2s, tok):
    prefix = kv_prefix(s2s)
    ids, mask = sources(tok, side="left")  # what encode_prompts gives; the seq2seq path re-pads to the right
    roll = rlprefix.reference_sample(s2s, tok, ids, mask, prefix, max_new_tokens=10, temperature=0.8,
                           generator=torch.Generator().manual_seed(0), return_hidden=True)
    assert roll.completion_mask.shape == roll.logprobs.shape and roll.hidden.shape[:2] == roll.logprobs.shape
    scored = score_completions(s2s, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                               prefix, temperature=0.8, output_hidden=True)
    m = roll.completion_mask
    assert ((scored.logprobs - roll.logprobs) * m).abs().max() < 1e-5
    assert ((scored.hidden - roll.hidden) * m.unsqueeze(-1)).abs().max() < 1e-5


def test_engine_and_generate_route_to_the_seq2seq_loop(s2s, tok):
    prefix, other = kv_prefix(s2s, seed=0), kv_prefix(s2s, seed=1)
    ids, mask = sources(tok)
    seeds = [11, 12, 13]
    alone = [engine.sample(s2s, tok, ids[i:i + 1], mask[i:i + 1], p, row_seeds=seeds[i:i + 1], max_new_tokens=8)
             for i, p in enumerate([prefix, None, other])]
    bank = PrefixBank(s2s, {"a": prefix, "b": other})
    mixed = engine.sample(s2s, tok, ids, mask, bank=bank, prefix_index=torch.tensor([0, -1, 1]), row_seeds=seeds,
                          max_new_tokens=8)
    for i, r in enumerate(alone):  # a row samples the same with its prefix in a mixed batch as alone
        n = int(r.completion_mask.sum())
        assert torch.equal(mixed.completion_ids[i, :n], r.completion_ids[0, :n])
        assert torch.allclose(mixed.logprobs[i, :n], r.logprobs[0, :n], atol=1e-6)
        assert mixed.texts[i] == r.texts[0]
    texts = rlprefix.generate(s2s, tok, SOURCES, prefix, max_new_tokens=6, seed=0, chat=False)
    assert len(texts) == 3 and texts == rlprefix.generate(s2s, tok, SOURCES, prefix, max_new_tokens=6, seed=0,
                                                          chat=False)
    with pytest.raises(ValueError, match="ensembling"):
        rlprefix.generate(s2s, tok, SOURCES, ensemble=[prefix, other], max_new_tokens=4, chat=False)


# ---- PPO: the policy's actions are the decoder's tokens -----------------------------------------------------------
def even_tokens(prompts, completions, completion_ids, **kw):
    """A toy reward that varies from the first step: the share of even token ids."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def test_ppo_first_ratio_is_one_and_base_is_untouched(s2s, tok):
    before = {k: v.clone() for k, v in s2s.state_dict().items()}
    prefix = rlprefix.Prefix.for_model(s2s, 4, "mlp", mlp_hidden=16)
    p0 = {k: v.clone() for k, v in prefix.state_dict().items()}
    cfg = rlprefix.PPOConfig(steps=2, batch_size=8, minibatch_size=4, epochs=2, max_new_tokens=6, lr=3e-2,
                             progress=False, chat=False, reference="initial")
    res = rlprefix.ppo(s2s, tok, prefix, SOURCES + ["the food"], even_tokens, cfg)
    assert all(h["policy/ratio_dev_first_minibatch"] < 1e-4 for h in res.history)
    assert all(torch.equal(before[k], v) for k, v in s2s.state_dict().items())
    assert any(not torch.equal(p0[k], v) for k, v in prefix.state_dict().items())


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_ppo_learns_a_toy_reward(s2s, tok, advantage):
    """The reward is the share of decoder tokens of the parity the bare model samples less often."""
    ids, mask = sources(tok)
    base = rlprefix.reference_sample(s2s, tok, ids.repeat(8, 1), mask.repeat(8, 1), max_new_tokens=8,
                           generator=torch.Generator().manual_seed(0))
    even = float(((base.completion_ids % 2 == 0) * base.completion_mask).sum() / base.completion_mask.sum())
    parity = 1 if even > 0.5 else 0

    def reward(prompts, completions, completion_ids, **kw):
        return [sum(t % 2 == parity for t in ids) / max(1, len(ids)) for ids in completion_ids]

    prefix = rlprefix.Prefix.for_model(s2s, 8, "kv", generator=torch.Generator().manual_seed(0))
    extra = dict(advantage="gae", kl_penalty="reward", reward_normalize=False, group_size=1) \
        if advantage == "gae" else {}
    cfg = rlprefix.PPOConfig(steps=25, batch_size=16, minibatch_size=8, epochs=4, max_new_tokens=8, lr=3e-2,
                             progress=False, chat=False, kl_coef=0.01, **extra)
    res = rlprefix.ppo(s2s, tok, prefix, SOURCES + ["the food"], reward, cfg)
    rewards = [h["reward/mean"] for h in res.history]
    assert sum(rewards[-5:]) / 5 > max(0.5, 2 * rewards[0]), rewards


def test_whole_run_on_a_t5_checkpoint(tmp_path):
    """`rlprefix run` on a T5 directory with the default text init: load, K/V of init_text, warm start, PPO,
    compress (anchored on the text's K/V), rlprefix + PEFT export."""
    from rlprefix.cli import main
    from rlprefix.config import PrefixSection
    from test_config import tiny_run_config

    assert PrefixSection().init == "text"  # the default this run relies on
    path = tiny_run_config(tmp_path, "t5")
    assert yaml.safe_load(path.read_text())["prefix"]["init"] == "text"
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "export_peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    model, _ = rlprefix.load_model(str(tmp_path / "model"))
    assert rlprefix.load_prefix(run / "prefix_compressed", model).spec.encoder_decoder
    assert rlprefix.load_prefix(run / "prefix_ppo", model).init_ids


def test_evaluate_reward_with_several_prefixes(s2s, tok):
    prefix = kv_prefix(s2s)

    def length(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    both = rlprefix.evaluate_reward(s2s, tok, {"base": None, "prefix": prefix}, SOURCES, length, chat=False,
                                    max_new_tokens=6)
    alone = rlprefix.evaluate_reward(s2s, tok, prefix, SOURCES, length, chat=False, max_new_tokens=6)
    assert both["prefix"].completions == alone.completions and both["base"].kl == 0.0
    assert both["prefix"].kl == pytest.approx(alone.kl, abs=1e-4)


def test_server_refuses_an_encoder_decoder_model(tmp_path):
    pytest.importorskip("fastapi")
    from rlprefix.serve.store import PrefixStore
    from rlprefix.serve.app import Server

    model = tiny_model("t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        Server(model, tiny_tokenizer(), PrefixStore(model, tmp_path), "t5")


def test_even_decoder_depth_leaves_pefts_odd_slots_unread(tok):
    """BART here has 2 decoder layers: in PEFT's layout both read slot 0, so slot 1 gets no gradient."""
    bart = tiny_model("bart", sharpen=3.0)
    prefix = kv_prefix(bart)
    ids, mask = sources(tok)
    comp, cmask = completions(len(SOURCES))
    seq2seq.score_completions(bart, ids, mask, comp, cmask, prefix).logprobs.sum().backward()
    assert prefix.kv.grad[0].abs().sum() > 0 and prefix.kv.grad[1].abs().sum() == 0


def test_shared_sources_run_the_encoder_once_with_the_same_scores(s2s, tok):
    ids, mask = sources(tok)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # 3 completions per source
    comp, cmask = completions(len(ids))
    prefix = kv_prefix(s2s)
    rows = []  # the encoder's batch size per call
    hook = s2s.get_encoder().register_forward_hook(lambda mod, args, out: rows.append(out[0].shape[0]))
    try:
        shared = score_completions(s2s, ids, mask, comp, cmask, prefix, share_prompts=True).logprobs
        apart = score_completions(s2s, ids, mask, comp, cmask, prefix, share_prompts=False).logprobs
    finally:
        hook.remove()
    assert rows == [len(SOURCES), len(ids)]
    assert torch.allclose(shared, apart, atol=1e-5)



def test_general_text_mixing_is_refused_and_forgetting_skipped(s2s, tok):
    """General text is decoder-only LM text: on an encoder-decoder model the forgetting measure is skipped (the
    default) and mixing it in is refused, naming the setting."""
    prefix = rlprefix.Prefix.for_model(s2s, 4, "kv", generator=torch.Generator().manual_seed(0))
    cfg = rlprefix.WarmStartConfig(steps=2, batch_size=4, eval_every=1, eval_fraction=0.25, progress=False)
    res = rlprefix.warm_start(s2s, tok, prefix, PAIRS, cfg)
    assert res.forgetting is None and "forgetting_ratio" not in res.history[-1]
    with pytest.raises(ValueError, match="warm_start.mix_ratio"):
        rlprefix.warm_start(s2s, tok, prefix, PAIRS, rlprefix.WarmStartConfig(steps=1, mix_ratio=0.05, progress=False))
