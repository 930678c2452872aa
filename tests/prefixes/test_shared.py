"""The layer-shared prefix (kind "shared"): its size, gradients, exact text init, merge, persistence, PEFT export,
warm start, PPO and YAML."""
import json
import math

import pytest
import torch

from rlprefix import Prefix, export_peft, kv_spec, load_prefix
from rlprefix.settings import ConfigError
from rlprefix.config import load_config
from rlprefix.train.data import load_records, tokenize_sft
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.prefixes.peft import load_peft_kv
from rlprefix.models.adapter import text_kv
from rlprefix.train.ppo import PPOConfig, ppo
from rlprefix.models.decoder_only import forward
from rlprefix.prefixes.layout import kv_to_rows
from rlprefix.prefixes.shared import default_shared_dim, shared_parameter_count
from rlprefix.train.warm_start import WarmStartConfig, evaluate_loss, warm_start
from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hello world", "Write a one-sentence review of a coffee shop.", "good"]
DATA = [{"prompt": f"review {w}", "completion": f"{w} is good great love"} for w in
        ["film", "food", "phone", "hotel", "park", "room", "staff", "actors"]]
TEXT = "Write a one-sentence review of a coffee shop."


@pytest.mark.parametrize("length", [4, 8, 16])
def test_parameter_count_is_the_formula_and_below_kv_and_mlp(model, length):
    spec = kv_spec(model)
    d = default_shared_dim(length)
    assert d == math.ceil(length / 4)
    shared = Prefix.for_model(model, length, "shared")
    assert shared.shared_dim == d
    assert shared.num_parameters() == length * d + spec.num_layers * d * 2 * spec.kv_dim
    assert shared.num_parameters() == shared_parameter_count(spec, length, d)
    # the tiny configs: 2 layers, kv_dim 32 (gpt2, 4 kv heads) or 16 (llama, 2 kv heads) -> e.g. length 8, d 2:
    # gpt2 16 + 2*2*64 = 272 vs kv 1024; llama 16 + 2*2*32 = 144 vs kv 512
    kv = Prefix.for_model(model, length, "kv").num_parameters()
    assert kv == spec.num_layers * 2 * length * spec.kv_dim
    assert shared.num_parameters() < kv
    for hidden in (16, 512):
        assert shared.num_parameters() < Prefix.for_model(model, length, "mlp", mlp_hidden=hidden).num_parameters()
    wide = Prefix.for_model(model, length, "shared", shared_dim=length)  # d = length: no saving left
    assert wide.num_parameters() == length * length + spec.num_layers * length * 2 * spec.kv_dim


@pytest.mark.parametrize("init", ["random", "text"])
def test_gradients_reach_the_shared_matrix_and_every_layer_map(model, tokenizer, init):
    if init == "text":
        prefix = Prefix.from_text(model, tokenizer, TEXT, length=6, kind="shared")
    else:
        prefix = Prefix.for_model(model, 6, "shared", generator=torch.Generator().manual_seed(0))
    assert {n for n, p in prefix.named_parameters()} == {"p_shared", "maps"}
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    forward(model, ids, mask, prefix).logits.logsumexp(-1).mean().backward()
    assert prefix.p_shared.grad is not None and prefix.p_shared.grad.abs().sum() > 0
    for layer in range(kv_spec(model).num_layers):
        assert prefix.maps.grad[layer].abs().sum() > 0, layer
    assert all(p.grad is None for p in model.parameters())


def test_text_init_is_exact_and_the_factors_are_the_least_squares_fit(model, tokenizer):
    prefix = Prefix.from_text(model, tokenizer, TEXT, length=8, kind="shared", shared_dim=3)
    target = text_kv(model, prefix.init_ids)
    assert torch.allclose(prefix.key_values(), target, atol=1e-5, rtol=1e-5)
    # P_shared W is the best rank-3 approximation of the text's K/V in PEFT's layout (Eckart-Young)
    fit = kv_to_rows(prefix.key_values().detach() - prefix.base)
    s = torch.linalg.svdvals(kv_to_rows(target))
    assert torch.linalg.matrix_rank(fit, rtol=1e-4) == 3
    assert (kv_to_rows(target) - fit).norm().item() == pytest.approx(s[3:].norm().item(), rel=1e-3)
    # acting like the text itself: the same logits as the text prepended to the input
    text_ids = torch.tensor([prefix.init_ids])
    ids = tokenizer("hello world", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with_prefix = forward(model, ids, torch.ones_like(ids), prefix).logits
    both = torch.cat([text_ids, ids], 1)
    plain = forward(model, both, torch.ones_like(both)).logits[:, text_ids.shape[1]:]
    assert (with_prefix - plain).abs().max() < 1e-4
    full = Prefix.from_text(model, tokenizer, TEXT, length=8, kind="shared", shared_dim=8)
    assert full.base.abs().max() < 1e-4 * target.abs().max()  # d = length: the factors hold everything


def test_merge_gives_identical_key_values_and_logits(model, tokenizer):
    prefix = Prefix.for_model(model, 5, "shared", generator=torch.Generator().manual_seed(3))
    merged = prefix.merge(model)
    assert merged.kind == "kv" and not hasattr(merged, "maps")
    assert torch.equal(merged.key_values(), prefix.key_values().detach())
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    assert torch.equal(forward(model, ids, mask, prefix).logits, forward(model, ids, mask, merged).logits)


def test_save_load_round_trip_is_exact_and_exports_to_peft(model, tokenizer, tmp_path):
    prefix = Prefix.from_text(model, tokenizer, TEXT, length=7, kind="shared", shared_dim=3)
    with torch.no_grad():
        prefix.maps.add_(0.01)  # a trained prefix, not only its init
    prefix.save(tmp_path / "p", metadata={"note": "shared"})
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["kind"] == "shared" and manifest["config"]["shared_dim"] == 3
    assert manifest["tensors"] == {"p_shared": [7, 3], "maps": [kv_spec(model).num_layers, 3, 2 * kv_spec(model).kv_dim],
                                   "base": [kv_spec(model).num_layers, 2, 7, kv_spec(model).kv_dim]}
    loaded = load_prefix(tmp_path / "p", model)
    assert loaded.kind == "shared" and loaded.shared_dim == 3 and loaded.init_ids == prefix.init_ids
    for k, v in prefix.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(loaded.key_values(), prefix.key_values())
    export_peft(prefix, model, tmp_path / "peft")
    assert torch.allclose(load_peft_kv(tmp_path / "peft", model), prefix.key_values().detach(), atol=1e-6)


def test_warm_start_reduces_the_loss_and_returns_plain_kv(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    examples = tokenize_sft(load_records(DATA), tok)
    prefix = Prefix.for_model(model, 8, "shared", generator=torch.Generator().manual_seed(0))
    before = evaluate_loss(model, prefix, examples, tok.pad_token_id)
    cfg = WarmStartConfig(steps=30, batch_size=4, lr=3e-2, warmup_steps=3, eval_every=10, eval_fraction=0.25,
                          progress=False, seed=0)
    res = warm_start(model, tok, prefix, DATA, cfg)
    assert res.prefix.kind == "kv"  # merged
    after = evaluate_loss(model, res.prefix, examples, tok.pad_token_id)
    assert after < 0.95 * before, (before, after)  # measured: 5.99 -> 5.34 (gpt2), 5.90 -> 5.44 (llama)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.2


def test_ppo_trains_both_factors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = Prefix.for_model(model, 4, "shared", generator=torch.Generator().manual_seed(1))
    p0 = {k: v.clone() for k, v in prefix.named_parameters()}

    def reward(prompts, completions, completion_ids, **kw):
        return [sum(t == 5 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    cfg = PPOConfig(steps=2, batch_size=8, minibatch_size=4, epochs=1, max_new_tokens=6, lr=3e-2, progress=False)
    res = ppo(model, tok, prefix, ["hello world", "review film", "the food", "a calm park"], reward, cfg)
    assert res.history[0]["policy/ratio_dev_first_minibatch"] < 1e-4
    for name, p in res.prefix.named_parameters():
        assert not torch.equal(p0[name], p), name


def test_yaml_kind_shared_validates():
    base = {"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}}
    cfg = load_config({**base, "prefix": {"kind": "shared", "length": 12, "shared_dim": 4}})
    assert cfg.prefix.kind == "shared" and cfg.prefix.shared_dim == 4
    assert load_config({**base, "prefix": {"kind": "shared"}}).prefix.shared_dim is None  # ceil(length / 4)
    with pytest.raises(ConfigError, match=r"prefix.shared_dim: 0 is out of range \(must be >= 1\)"):
        load_config({**base, "prefix": {"kind": "shared", "shared_dim": 0}})
    with pytest.raises(ValueError, match="shared_dim must be >= 1"):
        Prefix.for_model(tiny_model("llama"), 4, "shared", shared_dim=0)


def test_run_with_kind_shared(tmp_path):
    from rlprefix.cli import main
    from test_config import tiny_run_config

    path = tiny_run_config(tmp_path, prefix={"kind": "shared", "shared_dim": 2}, ppo={"enabled": False},
                           compress={"enabled": False}, export={"formats": ["rlprefix", "peft"]})
    assert main(["run", str(path)]) == 0
    saved = load_prefix(tmp_path / "run" / "prefix_warmstart")
    assert saved.kind == "kv" and saved.length == 4
    assert (tmp_path / "run" / "export_peft" / "adapter_model.safetensors").exists()
