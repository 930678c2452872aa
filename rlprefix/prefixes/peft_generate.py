"""Does the installed PEFT apply a prefix-tuning adapter in `generate`? Measured, not looked up in a version table.

PEFT injects a prefix adapter as `past_key_values`; transformers >= 5.24 passes `cache` inside `generate` and ignores
the deprecated name when both are set, so with PEFT 0.21 there a prefix adapter changes nothing in `PeftModel.generate`
(its forward still applies it). `peft_generate_applies_prefix()` checks the pair at hand once per process: a tiny
random Llama built from a config (no download), a random prefix adapter, one greedy token with and without it; first-
step logits that agree within float noise mean the adapter was ignored. `rlprefix.generate_kwargs` is the route that
works whatever PEFT does.
"""
from __future__ import annotations

import functools
import importlib.metadata
import warnings

import torch

NOISE = 1e-4  # first-step logits within this of the bare model's: the adapter did not reach generate


def versions() -> str:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    return f"peft {version('peft')} + transformers {version('transformers')}"


@functools.lru_cache(maxsize=None)
def peft_generate_applies_prefix() -> bool | None:
    """True when PEFT's `generate` applies a prefix-tuning adapter with the installed versions, False when it ignores
    it, None when PEFT is not installed."""
    try:
        import peft
    except ImportError:
        return None
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=16,
                      intermediate_size=32, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=1)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own calls (gradient-checkpointing and cache-argument deprecations)
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg).eval()
        adapter = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        model = peft.get_peft_model(base, adapter).eval()
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0, 1.0)
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own calls: the very deprecation this probe measures
        with_adapter = model.generate(**kw).logits[0]
        with model.disable_adapter():
            bare = model.generate(**kw).logits[0]
    return bool((with_adapter - bare).abs().max() > NOISE)


def ignored_warning() -> str | None:
    """One line for a user about to use an exported prefix adapter with PEFT's `generate`, or None when it works."""
    if peft_generate_applies_prefix() is not False:
        return None
    return (f"with {versions()}, PEFT's generate ignores prefix-tuning adapters (its forward "
            f"applies them): sample with transformers' own generate and rlprefix.generate_kwargs(prefix, model, "
            f"input_ids, attention_mask) instead")
