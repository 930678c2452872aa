"""The input-conditioned prefix (kind "dynamic", issue #16 item 3): router shapes, B=1 equals a static kv prefix,
per-row prefixes in generation equal each row alone, the warm start and PPO train bank and router, save/load,
errors."""
import json
import re

import pytest
import torch

from rlprefix import ModelMismatchError, Prefix, export_peft, generate, kv_spec, load_prefix
from rlprefix.settings import ConfigError
from rlprefix.config import load_config
from rlprefix.train.data import collate_sft, load_records, tokenize_sft
from rlprefix.prefixes.dynamic import REFUSALS, DynamicPrefix, dynamic_parameter_count
from rlprefix.decoding.bank import dynamic_bank
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.prefixes.lowrank import compress
from rlprefix.models.decoder_only import forward
from rlprefix.train.ppo import PPOConfig, ppo
from rlprefix.train.warm_start import WarmStartConfig, evaluate_loss, split_dataset, warm_start
from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hello world", "Write a one-sentence review of a coffee shop.", "good", "the film"]
TEXT = "Write a one-sentence review of a coffee shop."


def dyn(model, bank_size=3, length=4, seed=0):
    return Prefix.for_model(model, length, "dynamic", bank_size=bank_size, generator=torch.Generator().manual_seed(seed))


def test_router_and_key_value_shapes(model, tokenizer):
    spec = kv_spec(model)
    prefix = dyn(model, bank_size=3, length=5)
    assert isinstance(prefix, DynamicPrefix) and prefix.kind == "dynamic"
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    w = prefix.weights(model, ids, mask)
    assert w.shape == (4, 3) and torch.allclose(w.sum(-1), torch.ones(4)) and (w >= 0).all()
    assert not torch.allclose(w[0], w[1])  # different prompts route differently from the start
    kv = prefix.key_values(model, ids, mask)
    assert kv.shape == (4, spec.num_layers, 2, 5, spec.kv_dim)
    assert torch.allclose(kv[2], torch.einsum("b,blckd->lckd", w[2], prefix.bank), atol=1e-6)
    assert prefix.num_parameters() == dynamic_parameter_count(spec, 5, 3) == \
        3 * spec.num_layers * 2 * 5 * spec.kv_dim + (spec.hidden_size + 1) * 3
    # padding does not move the routing: a row's weights are the same alone and left-padded in a batch
    alone_ids, alone_mask = encode_prompts(tokenizer, PROMPTS[2:3])
    assert torch.allclose(prefix.weights(model, alone_ids, alone_mask)[0], w[2], atol=1e-6)


def test_bank_of_one_equals_a_static_kv_prefix(model, tokenizer):
    static = Prefix.from_text(model, tokenizer, TEXT, length=6, kind="kv")
    single = Prefix.from_text(model, tokenizer, TEXT, length=6, kind="dynamic", bank_size=1)
    assert torch.equal(single.bank[0], static.kv)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    assert torch.allclose(forward(model, ids, mask, single).logits, forward(model, ids, mask, static).logits,
                          atol=1e-6)
    assert generate(model, tokenizer, PROMPTS, single, do_sample=False, max_new_tokens=6) == \
        generate(model, tokenizer, PROMPTS, static, do_sample=False, max_new_tokens=6)


def test_generation_per_row_equals_each_row_alone_with_its_mixture(model, tokenizer):
    prefix = dyn(model, bank_size=3, length=4, seed=1)
    with torch.no_grad():
        prefix.bank.mul_(50)  # a strong prefix, so the rows' mixtures lead to different tokens
        prefix.router.weight.mul_(8)
    batched = generate(model, tokenizer, PROMPTS, prefix, do_sample=False, max_new_tokens=8)
    for prompt, text in zip(PROMPTS, batched):
        ids, mask = encode_prompts(tokenizer, [prompt])
        own = prefix.key_values(model, ids, mask)[0].detach()  # this row's mixed prefix, as a static K/V tensor
        static = Prefix(kv_spec(model), 4, "kv", init_kv=own)
        assert generate(model, tokenizer, [prompt], static, do_sample=False, max_new_tokens=8) == [text]
    assert len(set(batched)) > 1 and batched != generate(model, tokenizer, PROMPTS, None, do_sample=False,
                                                         max_new_tokens=8)
    # sampled: each prompt in a batch of its own (the same row seeds) gives the same text
    assert generate(model, tokenizer, PROMPTS, prefix, max_new_tokens=8, seed=3) == \
        generate(model, tokenizer, PROMPTS, prefix, max_new_tokens=8, seed=3, batch_size=1)
    bank, index = dynamic_bank(model, prefix, *encode_prompts(tokenizer, PROMPTS))
    assert len(bank) == 4 and index.tolist() == [0, 1, 2, 3]


def test_warm_start_trains_bank_and_router_routing_on_the_prompt():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = [{"prompt": f"{t} {w}", "completion": (w.upper() if t == "shout" else w[::-1])}
            for t in ("shout", "flip") for w in ("film", "food", "phone", "hotel", "park", "room")]
    prefix = dyn(model, bank_size=2, length=4)
    bank0, router0 = prefix.bank.detach().clone(), prefix.router.weight.detach().clone()
    examples = tokenize_sft(load_records(data), tok)
    batch = collate_sft(examples[:4], tok.pad_token_id)
    # the route mask of a training row is its prompt: the mixture is the one generation computes for that prompt
    seen = {}
    original = prefix.weights

    def spy(model_, ids, route_mask):
        seen["mask"] = route_mask
        return original(model_, ids, route_mask)

    prefix.weights = spy
    evaluate_loss(model, prefix, examples[:4], tok.pad_token_id)
    assert torch.equal(seen["mask"].cpu(), batch["attention_mask"] * (batch["labels"] == -100))
    del prefix.weights
    before = evaluate_loss(model, prefix, examples, tok.pad_token_id)
    assert not prefix.centre.any()
    cfg = WarmStartConfig(steps=30, batch_size=4, lr=3e-2, warmup_steps=3, eval_every=10, eval_fraction=0.25,
                          progress=False, seed=0, forgetting_eval=0)
    res = warm_start(model, tok, prefix, data, cfg)
    assert res.prefix is prefix and res.prefix.kind == "dynamic"  # merge keeps it (nothing to merge)
    # the router's centre: the average prompt's mean embedding over the training split (fitted once, at the start)
    train_ex = tokenize_sft(split_dataset(load_records(data), 0.25, 0)[0], tok)
    emb = model.get_input_embeddings().weight.detach()
    means = [emb[torch.tensor([t for t, lab in zip(e.input_ids, e.labels) if lab == -100])].mean(0) for e in train_ex]
    assert torch.allclose(prefix.centre, torch.stack(means).mean(0), atol=1e-6)
    assert not torch.equal(prefix.bank, bank0) and not torch.equal(prefix.router.weight, router0)
    after = evaluate_loss(model, res.prefix, examples, tok.pad_token_id)
    assert after < 0.95 * before, (before, after)


def test_save_load_round_trip_and_refused_on_another_architecture(tmp_path, tokenizer):
    model = tiny_model("llama")
    prefix = dyn(model, bank_size=3, length=4)
    prefix.save(tmp_path / "d", metadata={"note": "dynamic"})
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    spec = kv_spec(model)
    assert manifest["kind"] == "dynamic" and manifest["config"]["bank_size"] == 3
    assert manifest["tensors"] == {"bank": [3, spec.num_layers, 2, 4, spec.kv_dim], "centre": [spec.hidden_size],
                                   "router.weight": [3, spec.hidden_size], "router.bias": [3]}
    loaded = load_prefix(tmp_path / "d", model)
    assert isinstance(loaded, DynamicPrefix) and loaded.bank_size == 3
    for k, v in prefix.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    assert torch.equal(loaded.key_values(model, ids, mask), prefix.key_values(model, ids, mask))
    with pytest.raises(ModelMismatchError, match=r"made for a different model: prefix is for \[llama.*but the "
                                                 r"model is \[gpt2"):
        load_prefix(tmp_path / "d", tiny_model("gpt2"))


def test_what_a_dynamic_prefix_refuses(tmp_path, tokenizer):
    model = tiny_model("llama")
    prefix = dyn(model)
    with pytest.raises(ValueError, match=re.escape(REFUSALS["peft"])):
        export_peft(prefix, model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match=re.escape(REFUSALS["single_kv"])):
        prefix.key_values(model)
    with pytest.raises(ValueError, match=re.escape(REFUSALS["compress"])):
        compress(prefix, rank=1, model=model)
    # reference: initial is a frozen copy of the prefix (per-row K/V): the first step's KL to it is 0
    res = ppo(model, tokenizer, prefix, ["hello", "good"], lambda prompts, completions, **k: [float(len(c)) for c in completions],
              PPOConfig(steps=2, batch_size=4, group_size=2, minibatch_size=2, max_new_tokens=4, progress=False,
                        reference="initial"))
    assert abs(res.history[0]["kl"]) < 1e-4 and res.history[1]["kl"] != 0
    with pytest.raises(ValueError, match=re.escape(REFUSALS["bank"])):
        generate(model, tokenizer, PROMPTS[:2], [prefix, None])
    with pytest.raises(ValueError, match="bank_size must be >= 1"):
        Prefix.for_model(model, 4, "dynamic", bank_size=0)


@pytest.mark.parametrize("share", [True, False])
def test_ppo_trains_bank_and_router_with_exact_first_ratio(share, monkeypatch):
    """Rollouts on the engine's per-row path and the training forward (prompts shared or not) route alike: the
    first PPO ratio is 1."""
    import rlprefix.train.ppo_rollout as ppo_mod  # the policy and reference forwards
    from rlprefix.models import adapter as runtime

    if not share:  # every row its own prompt forward (no prompt sharing)
        real = runtime.score_completions
        monkeypatch.setattr(ppo_mod, "score_completions", lambda *a, **k: real(*a, **{**k, "share_prompts": False}))
    model, tok = tiny_model("llama", sharpen=4.0), tiny_tokenizer()
    prefix = dyn(model, bank_size=2, length=4, seed=1)
    p0 = {k: v.clone() for k, v in prefix.named_parameters()}

    def reward(prompts, completions, completion_ids, **kw):
        return [sum(t == 5 for t in ids) / max(1, len(ids)) + 0.1 * len(ids) for ids in completion_ids]

    cfg = PPOConfig(steps=2, batch_size=8, minibatch_size=4, epochs=1, max_new_tokens=6, lr=3e-2, progress=False)
    res = ppo(model, tok, prefix, ["hello world", "review film", "the food", "a calm park"], reward, cfg)
    assert res.history[0]["policy/ratio_dev_first_minibatch"] < 1e-4
    for name, p in res.prefix.named_parameters():
        assert not torch.equal(p0[name], p), name


def test_evaluate_reward_with_a_dynamic_prefix(tokenizer):
    model = tiny_model("llama")
    prefix = dyn(model)
    res = evaluate_reward(model, tokenizer, prefix, PROMPTS, lambda prompts, completions, **k: [float(len(x)) for x in completions],
                          max_new_tokens=5, seed=0)
    assert len(res.rewards) == len(PROMPTS) and res.kl > 0
    with pytest.raises(ValueError, match=re.escape(REFUSALS["bank"])):
        evaluate_reward(model, tokenizer, [prefix, None], PROMPTS, lambda prompts, completions, **k: [0.0] * len(completions), max_new_tokens=2)


@pytest.mark.parametrize("over,message", [
    ({}, re.escape(f"compress.enabled: {REFUSALS['compress']}")),
    ({"compress": {"enabled": False}}, re.escape(f"export.formats: {REFUSALS['peft']}")),
    ({"prefix": {"kind": "dynamic", "bank_size": 0}}, r"prefix.bank_size: 0 is out of range \(must be >= 1\)"),
])
def test_yaml_errors(over, message):
    raw = {"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}, "prefix": {"kind": "dynamic"}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_run_with_kind_dynamic(tmp_path):
    from rlprefix.cli import main
    from test_config import tiny_run_config

    path = tiny_run_config(tmp_path, prefix={"kind": "dynamic", "bank_size": 2}, ppo={"steps": 2},
                           compress={"enabled": False}, export={"formats": ["rlprefix"]})
    assert main(["run", str(path)]) == 0
    out = tmp_path / "run"
    saved = load_prefix(out / "prefix_warmstart")
    assert saved.kind == "dynamic" and saved.bank_size == 2 and saved.length == 4
    trained = load_prefix(out / "prefix_ppo")
    assert trained.kind == "dynamic" and not torch.equal(trained.bank, saved.bank)
    assert load_prefix(out / "export_rlprefix").kind == "dynamic"
    summary = json.loads((out / "summary.json").read_text())
    assert {"before", "after_warm_start", "after", "ppo"} <= set(summary)
    assert summary["exports"] == {"rlprefix": str(out / "export_rlprefix")}


def test_serve_refuses_a_dynamic_prefix_and_serves_the_rest(tmp_path):
    from rlprefix.serve.store import PrefixStore

    model = tiny_model("llama")
    dyn(model).save(tmp_path / "served" / "dynamic")
    Prefix.for_model(model, 4, "kv").save(tmp_path / "served" / "static")
    report = PrefixStore(model, tmp_path / "served").scan()
    assert report["loaded"] == ["static"]
    assert "input-conditioned" in report["refused"]["dynamic"]
