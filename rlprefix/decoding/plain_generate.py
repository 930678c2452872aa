"""A prefix in plain transformers: the keyword arguments with which `model.generate(**kwargs, ...)` samples with a
prefix, no PEFT needed. The route that works whatever PEFT does (PEFT 0.21 + transformers >= 5.25 ignore a
prefix-tuning adapter in `generate`: see docs/compatibility.md).

How: the prefix K/V go into a fresh transformers cache (`cache` or `past_key_values`, whichever the model's forward
takes), and the sequence transformers is given starts with `length` placeholder tokens that stand for the cached
prefix, so that `generate` feeds only the real tokens and counts their positions from `length` on, as rlprefix and
PEFT do. The attention mask covers the prefix with ones. On an encoder-decoder model the placeholders sit in front of
the decoder start token (they are start tokens themselves, as `generate` wants decoder inputs to begin with it) and
the source goes to the encoder as it is. The returned sequences keep the placeholders:
the new tokens are `output[:, kwargs[PROMPT_KEY].shape[1]:]` (`new_tokens` does that).
"""
from __future__ import annotations

import torch

from rlprefix.models import build_cache, family_of, prefix_kv
from rlprefix.models.family import cache_keyword
from rlprefix.models.sampling import pad_token_id


def generate_kwargs(prefix, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    tokenizer=None) -> dict:
    """Keyword arguments for transformers' `model.generate(**kwargs, max_new_tokens=..., ...)` with `prefix` applied.

    `input_ids` / `attention_mask`: left-padded prompts (decoder-only) or sources (encoder-decoder), as a tokenizer
    returns them. `prefix`: any fixed prefix (a Prefix, CompressedPrefix, a K/V tensor [layers, 2, length, kv_dim]) or
    None. The cache is built for one call: build the kwargs again for every `generate`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kv = prefix_kv(model, prefix)
    length = 0 if kv is None else kv.shape[-2]
    fill = pad_token_id(tokenizer, model) if tokenizer is not None else 0
    inputs = family_of(model).generate_inputs(model, input_ids.to(model.device), attention_mask.to(model.device),
                                              length, fill)
    return {**inputs, cache_keyword(model): build_cache(model, kv, input_ids.shape[0])}


def new_tokens(output: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The tokens `generate` added, from its output for `generate_kwargs(...)`."""
    key = "decoder_input_ids" if "decoder_input_ids" in kwargs else "input_ids"
    return output[:, kwargs[key].shape[1]:]
