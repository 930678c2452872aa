"""The rollout engine's static cache: one preallocated cache per batch laid out [prefix slots | prompt | completion],
the 4D additive masks over it, starting rows (each row's prefix K/V and prompt), and the one-token model step (eager,
or under CUDA graphs with `compile`). The server's running batch (rlprefix/serve) starts rows here too.
"""
from __future__ import annotations

import weakref

import torch
from transformers import StaticCache

from rlprefix.decoding.bank import PrefixBank
from rlprefix.models.decoder_only import position_ids
from rlprefix.models.family import call
from rlprefix.models.sampling import distinct_rows, model_dtype
from rlprefix.models.spec import kv_spec


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def prefill_mask(key_valid: torch.Tensor, first: int, length: int, dtype) -> torch.Tensor:
    """[B, 1, length, L]: query slot first+i sees valid key slots <= first+i, and always itself (pad rows)."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    q = first + torch.arange(length, device=key_valid.device).unsqueeze(1)
    allowed = (key_valid.unsqueeze(1) & (slots <= q)) | (slots == q)
    return additive(allowed.unsqueeze(1), dtype)


def decode_mask(key_valid: torch.Tensor, slot: torch.Tensor, dtype) -> torch.Tensor:
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    return additive((key_valid & (slots <= slot)).unsqueeze(1).unsqueeze(1), dtype)


def model_step(model, ids, pos, mask, cache, hidden: bool):
    out = call(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
               output_hidden_states=hidden)
    h = out.hidden_states[-1][:, -1].clone() if hidden else None
    return out.logits[:, -1].float().clone(), h


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_step(model):
    """The decode step under CUDA graphs (one compiled function per model; shapes are bucketed by the caller)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model_step, mode="reduce-overhead", dynamic=False)
    return _COMPILED[model]


def new_cache(model, batch: int, length: int, reuse: bool) -> StaticCache:
    """A static cache; with `reuse` (the compiled path) one per (batch, length) bucket is kept and reset, so the
    captured graphs see the same addresses."""
    if not reuse:
        return StaticCache(config=model.config, max_cache_len=length)
    pool = _CACHES.setdefault(model, {})
    if (batch, length) not in pool:
        pool[(batch, length)] = StaticCache(config=model.config, max_cache_len=length)
    cache = pool[(batch, length)]
    cache.reset()
    return cache


def write_prefixes(cache, bank: PrefixBank | None, index: torch.Tensor, spec) -> None:
    """Write each row's prefix K/V into the first `bank.max_length` slots (once per batch)."""
    if bank is None or bank.max_length == 0:
        return
    rows = index.clamp(min=0)
    p = bank.max_length
    for layer in range(spec.num_layers):
        k, v = (bank.kv[rows, layer, i].view(-1, p, spec.num_kv_heads, spec.head_dim).transpose(1, 2) for i in (0, 1))
        cache.update(k.contiguous(), v.contiguous(), layer)


def prefill(model, prompt_ids, pos, key_valid, pmax: int, tp: int, cache, bank, index, spec, total: int,
            hidden: bool):
    """Run the prompts into `cache` (whose prefix slots are written); returns the last position's logits/hidden.

    Rows with the same prompt and the same prefix (k completions per prompt in group RL) are run once, into a
    cache of the unique rows whose K/V are then copied out to every row.
    """
    dtype = model_dtype(model)
    first, inverse = distinct_rows(torch.cat([prompt_ids, key_valid[:, :pmax + tp].long(), index.unsqueeze(1)], 1))
    if len(first) == prompt_ids.shape[0]:
        return model_step(model, prompt_ids, pos, prefill_mask(key_valid, pmax, tp, dtype), cache, hidden)
    small = StaticCache(config=model.config, max_cache_len=total)
    write_prefixes(small, bank, index[first], spec)
    logits, h = model_step(model, prompt_ids[first], pos[first], prefill_mask(key_valid[first], pmax, tp, dtype),
                           small, hidden)
    for s, b in zip(small.layers, cache.layers):
        keys, values = s.keys.index_select(0, inverse), s.values.index_select(0, inverse)
        if not b.is_initialized:
            b.lazy_initialization(keys, values)
        b.keys.copy_(keys)
        b.values.copy_(values)
        b.cumulative_length.copy_(s.cumulative_length)
    return logits[inverse], (h[inverse] if h is not None else None)


def open_rows(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, bank: PrefixBank | None,
              index: torch.Tensor, cache, total: int, hidden: bool = False):
    """Start decoding left-padded prompts: each row's prefix K/V and its prompt into `cache`, laid out
    [prefix slots (bank.max_length) | prompt | total - both], the prompt's real tokens at positions plen_b, plen_b + 1...

    Returns (key_valid [B, total]: the row's prefix, its real prompt tokens and every slot after the prompt;
    position of the last prompt token [B, 1]; next-token logits [B, V]; last hidden state or None). The rollout engine
    and the server's running batch (`continuous`) both start rows here, so a row starts the same way in either.
    """
    device = prompt_ids.device
    plen = torch.tensor([bank.lengths[i] if i >= 0 else 0 for i in index.tolist()] if bank else [0] * len(index),
                        device=device)
    pmax = bank.max_length if bank else 0
    tp, spec = prompt_ids.shape[1], kv_spec(model)
    write_prefixes(cache, bank, index, spec)
    slots = torch.arange(pmax, device=device)
    key_valid = torch.cat([slots < plen.unsqueeze(1), prompt_mask.bool(),
                           prompt_mask.new_ones(len(index), total - pmax - tp, dtype=torch.bool)], dim=1)
    pos = position_ids(prompt_mask, plen.unsqueeze(1))
    logits, h = prefill(model, prompt_ids, pos, key_valid, pmax, tp, cache, bank, index, spec, total, hidden)
    return key_valid, pos[:, -1:], logits, h


def bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
