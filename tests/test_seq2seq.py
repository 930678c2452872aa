"""Encoder-decoder models (tiny random T5 and BART): prefix shapes, PEFT equality, save/load, warm start, sampling, PPO."""
import json

import pytest
import torch

import rlprefix
from rlprefix import seq2seq
from rlprefix.artifacts import ModelMismatchError
from rlprefix.peft_export import export_peft
from tiny import tiny_model, tiny_tokenizer

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
    back = rlprefix.peft_export.load_peft_kv(tmp_path / "peft", s2s)
    assert torch.allclose(back, prefix.kv.detach(), atol=1e-6)


def test_peft_generate_matches_greedy_sampling(s2s, tok, tmp_path):
    """PEFT's own generate (its prefill hook puts the prefix in) decodes the same greedy tokens as rlprefix."""
    peft = pytest.importorskip("peft")
    prefix = kv_prefix(s2s)
    export_peft(prefix, s2s, tmp_path / "peft")
    ids, mask = sources(tok)
    roll = rlprefix.sample(s2s, tok, ids, mask, prefix, max_new_tokens=6, do_sample=False)
    pm = peft.PeftModel.from_pretrained(s2s, tmp_path / "peft").eval()
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=0,
                      eos_token_id=1, pad_token_id=0)
    theirs = out[:, 1:]  # drop the decoder start token
    width = min(theirs.shape[1], roll.completion_ids.shape[1])
    ours = roll.completion_ids[:, :width].masked_fill(roll.completion_mask[:, :width] == 0, 0)
    assert torch.equal(ours, theirs[:, :width].masked_fill(roll.completion_mask[:, :width] == 0, 0))


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
        rlprefix.runtime.prefix_kv(llama, prefix)
    decoder_only = rlprefix.Prefix.for_model(llama, 4, "kv")
    decoder_only.save(tmp_path / "d")
    with pytest.raises(ModelMismatchError, match="decoder-only.*encoder-decoder"):
        rlprefix.load_prefix(tmp_path / "d", s2s)
    with pytest.raises(ModelMismatchError, match="decoder-only model .* but the model is encoder-decoder"):
        rlprefix.runtime.prefix_kv(s2s, decoder_only)


def test_unsupported_kinds_are_refused(s2s, tok):
    with pytest.raises(ValueError, match="'prompt' prefix"):
        rlprefix.Prefix.for_model(s2s, 4, "prompt")
    with pytest.raises(ValueError, match="from_text is not supported on encoder-decoder"):
        rlprefix.Prefix.from_text(s2s, tok, "hello world")
