"""The prefix core: shapes, attachment, padding, logprob consistency, merge, gradients, persistence."""
import json

import pytest
import torch

from rlprefix import ArtifactError, ModelMismatchError, Prefix, kv_spec, load_prefix
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.adapter import reference_sample as sample
from rlprefix.models.decoder_only import forward
from rlprefix.models.adapter import score_completions
from tiny import tiny_model, peft_calls

PROMPTS = ["hello world", "Write a one-sentence review of a coffee shop.", "good"]


def batch(tokenizer, prompts=PROMPTS):
    return encode_prompts(tokenizer, prompts)


@pytest.mark.parametrize("arch,kv_heads,head_dim", [("gpt2", 4, 8), ("llama", 2, 8), ("llama-mqa", 1, 8),
                                                     ("qwen2", 2, 8)])
def test_shapes_come_from_config(arch, kv_heads, head_dim):
    m = tiny_model(arch)
    spec = kv_spec(m)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, kv_heads, head_dim)
    for kind in ("kv", "mlp", "prompt"):
        p = Prefix.for_model(m, 6, kind)
        assert p.key_values(m).shape == (2, 2, 6, kv_heads * head_dim)


def test_prefix_changes_output_and_zero_length_does_not(model, tokenizer):
    ids, mask = batch(tokenizer)
    base = forward(model, ids, mask).logits
    with_prefix = forward(model, ids, mask, Prefix.for_model(model, 4, "kv")).logits
    empty = forward(model, ids, mask, Prefix.for_model(model, 0, "kv")).logits
    assert (with_prefix - base).abs().max() > 1e-3
    assert torch.equal(empty, base)


@pytest.mark.parametrize("kind", ["kv", "mlp", "prompt"])
def test_left_padding_gives_each_row_its_own_logits(model, tokenizer, kind):
    prefix = Prefix.for_model(model, 5, kind, generator=torch.Generator().manual_seed(1))
    ids, mask = batch(tokenizer)
    full = forward(model, ids, mask, prefix).logits
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        alone = forward(model, ids[row:row + 1, keep], mask[row:row + 1, keep], prefix).logits[0]
        assert (full[row, keep] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["kv", "mlp", "prompt"])
def test_sampled_logprobs_equal_recomputed(model, tokenizer, kind):
    prefix = Prefix.for_model(model, 5, kind, generator=torch.Generator().manual_seed(2))
    ids, mask = batch(tokenizer, PROMPTS * 2)  # mixed prompt lengths -> left padding
    assert (mask == 0).any()
    r = sample(model, tokenizer, ids, mask, prefix, max_new_tokens=16, temperature=0.7, top_k=50,
               generator=torch.Generator().manual_seed(0))
    scores = score_completions(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, prefix,
                               temperature=0.7)
    m = r.completion_mask.bool()
    assert m.sum() > 10
    assert (scores.logprobs[m] - r.logprobs[m]).abs().max() < 1e-4


def test_eos_stops_rows_and_masks_the_rest(tokenizer):
    model = tiny_model("llama")
    ids, mask = batch(tokenizer)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size), requires_grad=False)
    model.lm_head.bias.data[1] = 50.0  # EOS (id 1) dominates: every row stops after one token
    r = sample(model, tokenizer, ids, mask, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape[1] == 1 and r.completion_mask.sum() == ids.shape[0]


def test_text_init_acts_like_the_text_itself(model, tokenizer):
    """A "kv" prefix from real words gives exactly the logits of the text prepended to the input."""
    prefix = Prefix.from_text(model, tokenizer, "positive review", kind="kv")
    text_ids = tokenizer("positive review", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert prefix.length == text_ids.shape[1]
    ids = tokenizer("hello world", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with_prefix = forward(model, ids, torch.ones_like(ids), prefix).logits
    both = torch.cat([text_ids, ids], 1)
    plain = forward(model, both, torch.ones_like(both)).logits[:, text_ids.shape[1]:]
    assert (with_prefix - plain).abs().max() < 1e-4
    tiled = Prefix.from_text(model, tokenizer, "positive review", length=7, kind="mlp")
    assert tiled.length == 7 and torch.allclose(tiled.key_values(), tiled.base)  # MLP starts at zero offset


@pytest.mark.parametrize("kind", ["mlp", "prompt"])
def test_merge_keeps_outputs_identical(model, tokenizer, kind):
    prefix = Prefix.for_model(model, 5, kind, generator=torch.Generator().manual_seed(3))
    merged = prefix.merge(model)
    assert merged.kind == "kv" and not hasattr(merged, "mlp")
    ids, mask = batch(tokenizer)
    a, b = forward(model, ids, mask, prefix).logits, forward(model, ids, mask, merged).logits
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["kv", "mlp", "prompt"])
def test_gradients_reach_only_the_prefix(model, tokenizer, kind):
    prefix = Prefix.for_model(model, 4, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(prefix.parameters(), lr=1e-2)
    ids, mask = batch(tokenizer)
    logits = forward(model, ids, mask, prefix).logits
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.parameters())
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["kv", "mlp", "prompt"])
def test_save_load_round_trip_is_exact(model, tmp_path, kind):
    prefix = Prefix.for_model(model, 3, kind, generator=torch.Generator().manual_seed(4))
    prefix.save(tmp_path / "p", metadata={"note": "hi"})
    loaded = load_prefix(tmp_path / "p", model)
    assert loaded.kind == kind and loaded.manifest["provenance"] == {"note": "hi"}
    for k, v in prefix.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["model"]["fingerprint"] == kv_spec(model).fingerprint()


def test_prefix_for_another_model_is_refused(tmp_path):
    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")
    Prefix.for_model(gpt2, 3, "kv").save(tmp_path / "p")
    with pytest.raises(ModelMismatchError, match=r"gpt2: 2 layers x 4 kv heads.*llama: 2 layers x 2 kv heads"):
        load_prefix(tmp_path / "p", llama)
    with pytest.raises(ValueError, match="the model needs"):
        forward(llama, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                kv=Prefix.for_model(gpt2, 3, "kv").key_values())


def test_corrupt_files_fail_clearly_and_overwrite_keeps_old_on_failure(model, tmp_path, monkeypatch):
    path = tmp_path / "p"
    Prefix.for_model(model, 3, "kv").save(path)
    data = (path / "prefix.safetensors").read_bytes()
    (path / "prefix.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_prefix(path, model)
    (path / "prefix.safetensors").write_bytes(data)
    (path / "manifest.json").write_text('{"format": "rlprefix-prefix", "format_')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_prefix(path, model)
    with pytest.raises(ArtifactError, match="not an rlprefix prefix directory"):
        load_prefix(tmp_path / "missing", model)
    # a failed save leaves the previous artifact in place
    good = tmp_path / "good"
    first = Prefix.for_model(model, 3, "kv")
    first.save(good)

    import rlprefix.files as rio

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rio, "atomic_write_json", boom)  # tensors written, manifest fails
    with pytest.raises(OSError, match="disk full"):
        Prefix.for_model(model, 3, "kv").save(good)
    monkeypatch.undo()
    assert torch.equal(load_prefix(good, model).kv, first.kv)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unsupported_format_version(model, tmp_path):
    path = tmp_path / "p"
    Prefix.for_model(model, 3, "kv").save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        load_prefix(path, model)


@peft_calls
def test_matches_peft_prefix_tuning(model, tokenizer):
    peft = pytest.importorskip("peft")
    from rlprefix.prefixes.peft import kv_to_peft, peft_to_kv

    prefix = Prefix.for_model(model, 4, "kv", generator=torch.Generator().manual_seed(5))
    kv = prefix.key_values()
    assert torch.equal(peft_to_kv(kv_to_peft(kv), 2), kv)
    spec = kv_spec(model)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_layers=spec.num_layers,
                                  token_dim=spec.kv_dim, num_attention_heads=spec.num_kv_heads)
    pm = peft.get_peft_model(model, cfg)
    pm.prompt_encoder["default"].embedding.weight.data.copy_(kv_to_peft(kv))
    ids = tokenizer("hello world, a calm park", add_special_tokens=False, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    ours = forward(model, ids, mask, prefix).logits
    theirs = pm(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max() < 1e-5
