"""Compression: exact at full rank, monotone in rank, energy selection, formats round-trip, PEFT export.

Tests of exactness and of sizes ask for float32 factors: the default (CompressConfig.dtype, that of `rlprefix run`)
stores float16."""
import json

import pytest
import torch

from rlprefix import ArtifactError, ModelMismatchError, Prefix, load_prefix
from rlprefix.prefixes.lowrank import CompressedPrefix, choose_rank, compress, reconstruction_error
from rlprefix.train.compress import compress_to_budget, fidelity_report
from rlprefix.models.decoder_only import forward
from tiny import tiny_model, tiny_tokenizer, peft_calls

PROMPTS = ["hello world", "a calm park", "review film", "the food"]


def trained_like_prefix(model, length=6):
    """Low effective rank plus noise, like a trained prefix."""
    g = torch.Generator().manual_seed(0)
    p = Prefix.for_model(model, length, "kv")
    L, _, P, D = p.kv.shape
    basis = torch.randn(3, D, generator=g)
    coef = torch.randn(L, 2, P, 3, generator=g)
    p.kv.data = coef @ basis + 0.05 * torch.randn(L, 2, P, D, generator=g)
    return p


@pytest.mark.parametrize("scope", ["matrix", "shared", "whole"])
def test_full_rank_is_exact_and_error_falls_with_rank(model, scope):
    prefix = trained_like_prefix(model)
    full = compress(prefix, scope=scope, dtype="float32")  # exact in float32 (the default stores float16)
    assert torch.allclose(full.key_values(), prefix.key_values(), atol=1e-5)
    errors = [sum(reconstruction_error(prefix, compress(prefix, rank=r, scope=scope, dtype="float32")))
              for r in (1, 2, 3, 4, 6)]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])) and errors[0] > errors[-1]


def test_energy_picks_what_it_says():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()  # 0.635, 0.917, 0.988, 1.0
    assert choose_rank(s, None, 0.6) == 1 and choose_rank(s, None, float(energy[1])) == 2
    assert choose_rank(s, None, 0.95) == 3 and choose_rank(s, None, 1.0) == 4
    assert choose_rank(s, 10, None) == 4 and choose_rank(s, None, None) == 4
    model = tiny_model("llama")
    comp = compress(trained_like_prefix(model), energy=0.9, scope="matrix")
    for (rows, r, cols), block in zip(comp.shapes, range(len(comp.shapes))):
        assert 1 <= r <= min(rows, cols)
    with pytest.raises(ValueError, match="energy must be in"):
        choose_rank(s, None, 1.5)


def test_compressed_prefix_drives_generation_and_reports_size(model, tokenizer):
    prefix = trained_like_prefix(model)
    comp = compress(prefix, rank=3, scope="shared", dtype="float32")
    ids = tokenizer(["hello world"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    a, b = forward(model, ids, mask, prefix).logits, forward(model, ids, mask, comp).logits
    c = forward(model, ids, mask, compress(prefix, rank=1, scope="shared", dtype="float32")).logits
    assert 0 < (a - b).abs().mean() < (a - c).abs().mean()
    assert comp.num_parameters() < comp.full_parameters() and comp.nbytes() == comp.num_parameters() * 4
    assert comp.compression_ratio() == pytest.approx(comp.full_parameters() / comp.num_parameters())
    assert torch.allclose(comp.merge().key_values(), comp.key_values())


def test_rlprefix_format_round_trip_and_errors(tmp_path):
    model = tiny_model("llama")
    comp = compress(trained_like_prefix(model), rank=2, scope="matrix")
    comp.save(tmp_path / "c", metadata={"reward": ["sentiment"]})
    loaded = load_prefix(tmp_path / "c", model)
    assert isinstance(loaded, CompressedPrefix) and loaded.ranks == comp.ranks
    assert torch.equal(loaded.key_values(), comp.key_values())
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["kind"] == "lowrank" and manifest["config"]["ranks"] == [2] * 4
    assert manifest["provenance"] == {"reward": ["sentiment"]}
    with pytest.raises(ModelMismatchError, match="different model"):
        load_prefix(tmp_path / "c", tiny_model("gpt2"))
    manifest["tensors"]["u.0"] = [6, 3]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        load_prefix(tmp_path / "c", model)


def test_fidelity_and_budget():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = trained_like_prefix(model)

    def reward(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    comp = compress(prefix, rank=1, scope="shared")
    rep = fidelity_report(model, tok, prefix, comp, PROMPTS, reward, max_new_tokens=6)
    assert rep["kl_per_token"] >= 0 and len(rep["relative_error_per_layer"]) == 2
    assert {"reward_base", "reward_full", "reward_compressed", "reward_retained"} <= set(rep)
    exact = fidelity_report(model, tok, prefix, compress(prefix, scope="shared", dtype="float32"), PROMPTS,
                            max_new_tokens=6)
    assert exact["kl_per_token"] < 1e-6
    chosen, trail = compress_to_budget(model, tok, prefix, PROMPTS, max_kl=0.05, scope="matrix", max_new_tokens=6)
    assert trail[-1]["budget_met"] and trail[-1]["kl_per_token"] <= 0.05 and max(chosen.ranks) == trail[-1]["rank"]
    assert all(t["kl_per_token"] > 0.05 for t in trail[:-1])


@peft_calls
@pytest.mark.parametrize("source", ["prefix", "compressed"])
def test_peft_export_loads_and_matches_logits(model, tokenizer, tmp_path, source):
    peft = pytest.importorskip("peft")
    from rlprefix.prefixes.peft import export_peft

    prefix = trained_like_prefix(model, length=5)
    obj = prefix if source == "prefix" else compress(prefix, rank=2, scope="shared")
    export_peft(obj, model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == 5
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "peft")
    ids = tokenizer(["a calm park with friendly people"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    ours = forward(model, ids, mask, obj).logits
    theirs = pm(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max() < 1e-5


def test_anchored_compression_factorises_only_the_learned_change(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    start = Prefix.from_text(model, tok, "positive review good", length=6, kind="kv")
    trained = Prefix.from_text(model, tok, "positive review good", length=6, kind="kv")
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 2, 6, 1, generator=g) @ torch.randn(1, trained.spec.kv_dim, generator=g)
    trained.kv.data += 0.05 * delta  # a small rank-1 change, like training makes
    zero = compress(trained, rank=0, scope="matrix", model=model)
    assert zero.anchor_ids == start.init_ids and zero.num_parameters() == 0
    assert torch.allclose(zero.key_values(model), start.kv, atol=1e-6)  # rank 0 = the text's own K/V
    one = compress(trained, rank=1, scope="matrix", model=model, dtype="float32")
    assert torch.allclose(one.key_values(model), trained.kv, atol=1e-5)  # the change was rank 1
    plain = compress(trained, rank=1, scope="matrix", dtype="float32")  # no model: no anchor
    assert plain.anchor_ids is None and (plain.key_values() - trained.kv).abs().max() > 1e-3
    half = compress(trained, rank=1, scope="matrix", model=model, dtype="float16")
    assert half.nbytes() * 2 == one.nbytes() and half.compression_ratio() == pytest.approx(2 * one.compression_ratio())
    half.save(tmp_path / "h")
    loaded = load_prefix(tmp_path / "h")
    with pytest.raises(ValueError, match="pass the model to rebuild them"):
        loaded.key_values()
    assert torch.allclose(load_prefix(tmp_path / "h", model).key_values(model), half.key_values(model))


def test_budget_never_returns_something_bigger_than_the_prefix():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = trained_like_prefix(model)
    comp, trail = compress_to_budget(model, tok, prefix, PROMPTS, max_kl=0.0, scope="shared", max_new_tokens=4,
                                     dtype="float32")
    assert trail[-1]["budget_met"] is False and comp.compression_ratio() > 1.0
    assert all(t.get("compression_ratio", 2.0) > 1.0 for t in trail)
