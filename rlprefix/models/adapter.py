"""Picking the model-family adapter, and the entry points that run a model with a prefix whatever its family.

`family_of(model)` is the one place that asks `config.is_encoder_decoder`; everything else goes through the family
it returns (see rlprefix/models/family.py for what a family owns).
"""
from __future__ import annotations

import torch

from rlprefix.models import decoder_only, encoder_decoder
from rlprefix.models.family import ModelFamily
from rlprefix.models.sampling import Rollout, SequenceScores
from rlprefix.models.spec import KVSpec, is_encoder_decoder


def family_of(model_or_config) -> ModelFamily:
    """The family adapter of a model, its config or a `KVSpec` (what a prefix was made for): `DecoderOnly` or
    `EncoderDecoder`."""
    if isinstance(model_or_config, KVSpec):
        seq2seq = model_or_config.encoder_decoder
    else:
        seq2seq = is_encoder_decoder(model_or_config)
    return encoder_decoder.FAMILY if seq2seq else decoder_only.FAMILY


def build_cache(model, kv: torch.Tensor | None, batch_size: int):
    """A fresh cache holding the prefix K/V ([layers, 2, P, kv_dim], or per row [batch, layers, 2, P, kv_dim] on a
    decoder-only model) for `batch_size` rows; gradients flow back into `kv`."""
    return family_of(model).build_cache(model, kv, batch_size)


def text_kv(model, ids: list[int]) -> torch.Tensor:
    """The frozen model's own K/V for a token sequence, [layers, 2, len, kv_dim] (float32, CPU); on an
    encoder-decoder model the decoder's, with a neutral source, in PEFT's slot order."""
    return family_of(model).text_kv(model, ids)


def sft_logits(model, batch: dict, prefix) -> torch.Tensor:
    """The logits of a collated supervised batch (`rlprefix.train.data.collate_sft`) under the prefix."""
    return family_of(model).sft_logits(model, batch, prefix)


def score_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix=None, *, kv=None,
                      temperature: float = 1.0, output_hidden: bool = False,
                      share_prompts: bool = True) -> SequenceScores:
    """Log-probs of completion tokens given prompts, in one differentiable forward (prompts shared across rows that
    carry the same one when `share_prompts`)."""
    return family_of(model).score_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix,
                                              kv=kv, temperature=temperature, output_hidden=output_hidden,
                                              share_prompts=share_prompts)


def reference_sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix=None, *,
                     max_new_tokens: int = 64, min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, do_sample: bool = True, generator: torch.Generator | None = None,
                     kv: torch.Tensor | None = None, decode: bool = True, return_hidden: bool = False,
                     row_seeds: list[int] | None = None) -> Rollout:
    """The reference decode loop (a transformers cache, one token at a time), with the prefix shared across the batch.

    The rollout engine (`rlprefix.decoding.engine.sample`) is the fast path with the same contract; this loop is kept
    as its oracle in tests. Randomness comes from `generator`, or, with `row_seeds`, from one generator per row: then
    each row's sample depends only on its own seed, not on which other rows share the batch (or the process).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    return family_of(model).sample(model, tokenizer, prompt_ids, prompt_mask, prefix, max_new_tokens=max_new_tokens,
                                   min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   do_sample=do_sample, generator=generator, kv=kv, decode=decode,
                                   return_hidden=return_hidden, row_seeds=row_seeds)
