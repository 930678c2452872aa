"""Running a frozen model with a prefix: caches (prefix K/V in, K/V of text out), masks, positions, log-probabilities.

Conventions (the same as PEFT's prefix tuning, so exported prefixes give the same logits there):
- the attention mask gets `length` ones prepended for the prefix;
- real tokens take positions length, length+1, ... counted over non-padding tokens only, so a
  left-padded row sees exactly what it would see alone;
- prefix keys enter the cache as they are (no rotary embedding is applied to them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import sharding
from .modeling import KVSpec, kv_spec


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def build_cache(model, kv: torch.Tensor | None, batch_size: int) -> DynamicCache:
    """A fresh DynamicCache holding the prefix K/V ([layers, 2, P, kv_dim]) for `batch_size` rows.

    The K/V are expanded (a view, not a copy) across the batch; gradients flow back into `kv`. Per-row K/V
    ([batch, layers, 2, P, kv_dim], an input-conditioned prefix) give each row its own.
    """
    cache = DynamicCache()
    if kv is None or kv.shape[-2] == 0:
        return cache
    spec = kv_spec(model)
    rows = kv if kv.dim() == 5 else kv.unsqueeze(0)
    if rows.shape[1] != spec.num_layers or rows.shape[4] != spec.kv_dim or rows.shape[0] not in (1, batch_size):
        raise ValueError(f"prefix K/V has shape {tuple(kv.shape)}, the model needs "
                         f"[{spec.num_layers}, 2, length, {spec.kv_dim}] ({spec.describe()}), or one per row of "
                         f"the {batch_size}")
    rows = rows.to(device=model.device, dtype=model_dtype(model))
    length = rows.shape[3]
    for layer in range(spec.num_layers):
        k, v = (rows[:, layer, i].view(rows.shape[0], length, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
                .expand(batch_size, -1, -1, -1) for i in (0, 1))
        cache.update(k, v, layer)
    return cache


# ---- caches back to K/V: the inverse of build_cache ------------------------------------------------------------
def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers Cache, each [batch, kv_heads, seq, head_dim]."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def cache_to_kv(cache, spec: KVSpec, row: int = 0) -> torch.Tensor:
    """One batch row of a cache as a [layers, 2, seq, kv_dim] tensor."""
    out = []
    for k, v in cache_layers(cache):
        out.append(torch.stack([x[row].transpose(0, 1).reshape(x.shape[2], spec.kv_dim) for x in (k, v)]))
    return torch.stack(out)


@torch.no_grad()
def text_kv(model, ids: list[int]) -> torch.Tensor:
    """The frozen model's own K/V for a token sequence, as [layers, 2, len, kv_dim] (float32, CPU)."""
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    return cache_to_kv(out.past_key_values, kv_spec(model)).float().cpu()


def prefix_kv(model, prefix, input_ids: torch.Tensor | None = None,
              route_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The prefix's K/V, or None for "no prefix" (a None prefix or a zero-length one). An input-conditioned
    prefix (kind dynamic) gives per-row K/V [rows, layers, 2, P, kv_dim] for `input_ids`, routed on the tokens
    where `route_mask` is 1."""
    if prefix is None or prefix.length == 0:
        return None
    if getattr(prefix, "input_conditioned", False):
        return prefix.key_values(model, input_ids, route_mask)
    return prefix.key_values(model)


def position_ids(attention_mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Positions counted over real tokens only, starting at `offset` (the prefix length)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) + offset


@dataclass
class ForwardOutput:
    logits: torch.Tensor               # [B, T_kept, V]
    hidden: torch.Tensor | None        # [B, T_kept, H], final hidden states (after the final norm)


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix=None, *,
            kv: torch.Tensor | None = None, logits_to_keep: int = 0, output_hidden: bool = False,
            route_mask: torch.Tensor | None = None) -> ForwardOutput:
    """One forward pass over full sequences with the prefix attached (pass `kv` to reuse computed K/V).
    `route_mask`: the prompt tokens an input-conditioned prefix routes on (default: every real token)."""
    if kv is None:
        kv = prefix_kv(model, prefix, input_ids, attention_mask if route_mask is None else route_mask)
    length = 0 if kv is None else kv.shape[-2]
    batch = input_ids.shape[0]
    cache = build_cache(model, kv, batch)
    full_mask = torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1)
    out = model(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids(attention_mask, length),
                past_key_values=cache, use_cache=True, output_hidden_states=output_hidden,
                logits_to_keep=logits_to_keep)
    hidden = None
    if output_hidden:
        hidden = out.hidden_states[-1]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
    return ForwardOutput(out.logits, hidden)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), gathered per position."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class SequenceScores:
    logprobs: torch.Tensor             # [B, Tc] log p of each completion token
    logits: torch.Tensor               # [B, Tc, V] the logits that predicted them
    hidden: torch.Tensor | None        # [B, Tc, H] hidden states at the predicting positions


def distinct_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `key` [B, ...] that are alike: (first [U], the first row of each distinct value; inverse [B], which
    distinct value each row has), so `x[first][inverse]` equals `x` for anything determined by the key."""
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(key.shape[0], device=inverse.device)
    first = torch.full((unique.shape[0],), key.shape[0], dtype=torch.long, device=inverse.device)
    return first.scatter_reduce(0, inverse, rows, "amin"), inverse


def score_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix=None, *,
                      kv=None, temperature: float = 1.0, output_hidden: bool = False,
                      share_prompts: bool = True) -> SequenceScores:
    """Log-probs of completion tokens given left-padded prompts.

    Only the logits of the completion positions are materialised (`logits_to_keep`). With `share_prompts`,
    rows that carry the same prompt (k completions per prompt, as in group-based RL) run the prompt once: the
    unique prompts fill a cache, which is then indexed out to every row for the completion forward. That is
    the same computation (logits agree to float rounding; gradients reach the prefix through both parts)
    at the cost of U*Tp + B*Tc tokens instead of B*(Tp+Tc).
    """
    rows = prompt_ids.shape[0]
    if share_prompts:
        first, inverse = distinct_rows(torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1))
        # a sharded model runs the same forwards on every process: all share prompts (2 forwards) or none do
        if sharding.agree_any(model, len(first) < rows):
            return _score_shared(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix, kv,
                                 temperature, output_hidden, first, inverse)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    tc = completion_ids.shape[1]
    route = torch.cat([prompt_mask, torch.zeros_like(completion_mask)], dim=1)  # an input-conditioned prefix: the prompt
    out = forward(model, input_ids, mask, prefix, kv=kv, logits_to_keep=tc + 1, output_hidden=output_hidden,
                  route_mask=route)
    logits = out.logits[:, :-1]
    hidden = out.hidden[:, :-1] if out.hidden is not None else None
    return SequenceScores(logprobs_of(logits, completion_ids, temperature), logits, hidden)


def _score_shared(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix, kv, temperature,
                  output_hidden, first: torch.Tensor, inverse: torch.Tensor) -> SequenceScores:
    """score_completions with the prompt computed once per unique prompt (rows `first`, row r uses inverse[r])."""
    p_ids, p_mask = prompt_ids[first], prompt_mask[first]
    if kv is None:  # an input-conditioned prefix: one K/V per unique prompt, indexed out with the prompt's cache
        kv = prefix_kv(model, prefix, p_ids, p_mask)
    length = 0 if kv is None else kv.shape[-2]
    cache = build_cache(model, kv, len(first))
    # 1. the unique prompts, keeping the logit (and hidden state) of their last position: it predicts token 1
    head = model(input_ids=p_ids, attention_mask=torch.cat([p_mask.new_ones(len(first), length), p_mask], 1),
                 position_ids=position_ids(p_mask, length), past_key_values=cache, use_cache=True,
                 logits_to_keep=1, output_hidden_states=output_hidden)
    cache = head.past_key_values
    cache.reorder_cache(inverse)  # index_select per layer: every row gets its prompt's K/V (differentiable)
    # 2. every row's completion against its prompt's cache
    full = torch.cat([prompt_mask, completion_mask], dim=1)
    tp = prompt_ids.shape[1]
    tail = model(input_ids=completion_ids, attention_mask=torch.cat([full.new_ones(len(full), length), full], 1),
                 position_ids=position_ids(full, length)[:, tp:], past_key_values=cache, use_cache=True,
                 output_hidden_states=output_hidden)
    logits = torch.cat([head.logits[inverse], tail.logits[:, :-1]], dim=1)
    hidden = None
    if output_hidden:
        hidden = torch.cat([head.hidden_states[-1][:, -1:][inverse], tail.hidden_states[-1][:, :-1]], dim=1)
    return SequenceScores(logprobs_of(logits, completion_ids, temperature), logits, hidden)
