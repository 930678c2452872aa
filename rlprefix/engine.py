"""The rollout engine: fast batched sampling with many prefixes in one batch.

What it does differently from the reference loop (`generation.sample`, kept for tests):
- one preallocated static KV cache per batch, laid out [prefix slots | prompt | completion];
  the prefix K/V are written into it once (transformers' public `StaticCache.update`);
- per-row prefixes: a `PrefixBank` holds several prefixes, `prefix_index[b]` picks one per row
  (-1 = bare model). Shorter prefixes are padded and masked out; real tokens of row b take positions
  len_b, len_b+1, ... (the PEFT convention of `runtime.position_ids`), so a row gives the same logits
  whatever its neighbours carry;
- the attention mask is a 4D additive mask built here (the model takes it as-is), so it must run with
  the "sdpa" or "eager" attention implementation;
- no host synchronisation inside the decode loop: "all rows finished" is checked every
  `stop_check_every` tokens;
- sampling on the device with counter-based randomness: the uniform for row b at token t is a hash of
  (seed_b, t) computed with integer tensor ops, then inverse-CDF sampling over the filtered distribution.
  A row's sample depends only on its seed, not on the batch. (The same seed gives different tokens than
  the reference loop, which draws from `torch.Generator`s.)
- on CUDA (`compile=True`) the one-token decode step runs under `torch.compile(mode="reduce-overhead")`
  (CUDA graphs) with batch sizes bucketed to powers of two and cache lengths to multiples of 64; eager on CPU.

Log-probabilities are those of the policy softmax(logits / T), not of the top-k/top-p warped distribution,
exactly as in the reference loop; with an ensemble they are of the averaged policy.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
from transformers import StaticCache

from . import seq2seq, sharding
from .generation import Rollout, encode_prompts, filter_logits
from .dynamic_prefix import is_input_conditioned
from .modeling import is_encoder_decoder, kv_spec
from .primitives import stop_and_pad
from .runtime import distinct_rows, model_dtype, position_ids, prefix_kv

M32 = 0xFFFFFFFF

StepHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | list[bool] | None"]
"""`sample(on_step=...)`: (step t, tokens [B/k], alive [B/k]) -> rows to finish now, or None.

Called after every decode step, on the thread running `sample`. The tensors live on the model's device: reading
them (`.tolist()`) is a host sync, which the hook pays only when it needs the tokens (streaming); returning None
costs nothing. Returned rows count as finished from the next step on (no tokens, mask 0); rows already finished
may be included. Returning rows also makes the engine look at which rows are done right away (one sync): when all
are, the loop ends; otherwise, on the eager path, the finished rows are dropped from the batch so later steps no
longer compute them (under CUDA graphs, `compile=True`, the batch keeps its bucketed shape and they idle).
"""


# ----------------------------------------------------------------------------------------------------------
# the bank of prefixes

class PrefixBank:
    """Several prefixes for one model, stacked (zero-padded to the longest) on the model's device.

    `prefixes` is a dict name -> prefix, or a list (names are then "[0]", "[1]", ...). An entry may be a
    `Prefix`, a `CompressedPrefix`, a K/V tensor [layers, 2, length, kv_dim], or None (the bare model).
    """

    @torch.no_grad()
    def __init__(self, model, prefixes):
        items = prefixes.items() if isinstance(prefixes, dict) else ((f"[{i}]", p) for i, p in enumerate(prefixes))
        self.spec = kv_spec(model)
        self.names: list[str] = []
        kvs = []
        for name, p in items:
            self.names.append(str(name))
            kvs.append(_checked_kv(model, self.spec, str(name), p))
        if not self.names:
            raise ValueError("a PrefixBank needs at least one prefix")
        self.lengths = [0 if kv is None else kv.shape[2] for kv in kvs]
        self.max_length = max(self.lengths)
        spec = self.spec
        self.kv = torch.zeros(len(kvs), spec.num_layers, 2, self.max_length, spec.kv_dim, device=model.device,
                              dtype=model_dtype(model))
        for i, kv in enumerate(kvs):
            if kv is not None:
                self.kv[i, :, :, :kv.shape[2]] = kv.detach().to(self.kv)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(str(name))
        except ValueError:
            raise KeyError(f"no prefix named {name!r} in the bank (it has {self.names})") from None


def _checked_kv(model, spec, name: str, prefix) -> torch.Tensor | None:
    """The entry's K/V, or a ValueError naming the entry when it was made for another architecture."""
    if prefix is None:
        return None
    if is_input_conditioned(prefix):
        raise ValueError(f"prefix {name} is input-conditioned (kind dynamic): its K/V depend on each prompt, so it "
                         f"cannot share a bank with other prefixes or join an ensemble; pass it alone as `prefix`")
    own = getattr(prefix, "spec", None)
    if own is not None and own != spec:
        raise ValueError(f"prefix {name} was made for {own.describe()}; the model is {spec.describe()}")
    kv = prefix if isinstance(prefix, torch.Tensor) else prefix_kv(model, prefix)
    if kv is None or kv.shape[2] == 0:
        return None
    if kv.dim() != 4 or kv.shape[0] != spec.num_layers or kv.shape[1] != 2 or kv.shape[3] != spec.kv_dim:
        raise ValueError(f"prefix {name} has K/V of shape {tuple(kv.shape)}; the model needs "
                         f"[{spec.num_layers}, 2, length, {spec.kv_dim}] ({spec.describe()})")
    return kv


# ----------------------------------------------------------------------------------------------------------
# counter-based randomness: uniform(seed, token index) from integer hashing

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32); constants < 2^31 keep every
    product below 2^63, so nothing overflows on any backend."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    return x ^ (x >> 16)


def seed_halves(row_seeds: list[int], device) -> torch.Tensor:
    """[B, 2] int64: the low and high 32 bits of each seed (taken modulo 2^64)."""
    vals = [int(s) % (1 << 64) for s in row_seeds]
    return torch.tensor([[v & M32, v >> 32] for v in vals], dtype=torch.long, device=device)


def uniforms(seeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B] float32 in (0, 1): a pure function of (seed, step), 24 random bits."""
    h = _mix32(seeds[:, 1] ^ 0x3C6EF372)
    h = _mix32(h ^ seeds[:, 0])
    h = _mix32((h + step) & M32)
    h = _mix32(h ^ 0x1B873593)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


# ----------------------------------------------------------------------------------------------------------
# choosing the next token (all on the device)

def policy_logprobs(logits: torch.Tensor, temperature: float, groups: int) -> torch.Tensor:
    """log softmax(logits / T); with groups k > 1, rows come in runs of k and their probabilities are averaged."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if groups > 1:
        logp = torch.logsumexp(logp.view(-1, groups, logp.shape[-1]), dim=1) - math.log(groups)
    return logp


def choose(logp: torch.Tensor, u: torch.Tensor | None, top_k: int, top_p: float) -> torch.Tensor:
    """Greedy (u None) or inverse-CDF sampling from the top-k/top-p filtered distribution."""
    if u is None:
        return logp.argmax(-1)
    probs = torch.softmax(filter_logits(logp, top_k, top_p), dim=-1)
    cdf = probs.cumsum(-1)
    nxt = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return nxt.clamp(max=probs.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------------------
# masks, cache and the model step

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
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1, output_hidden_states=hidden)
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


# ----------------------------------------------------------------------------------------------------------
# the engine

@sharding.decode_loop
@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix=None, *,
           bank: PrefixBank | None = None, prefix_index: torch.Tensor | None = None, kv: torch.Tensor | None = None,
           max_new_tokens: int = 64, min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, do_sample: bool = True, generator: torch.Generator | None = None,
           row_seeds: list[int] | None = None, decode: bool = True, return_hidden: bool = False,
           stop_check_every: int = 8, groups: int = 1, force_tokens: torch.Tensor | None = None,
           compile: bool | None = None, on_step: StepHook | None = None) -> Rollout:
    """Sample completions for left-padded prompts; same keywords and `Rollout` as `generation.sample`.

    Prefixes: `prefix` or `kv` (one for every row), or `bank` + `prefix_index` (LongTensor [B], -1 = none).
    `groups` = k > 1: rows come in runs of k (the same prompt, k prefixes); their next-token probabilities are
    averaged, one token is sampled per run and the Rollout has one row per run (prompt ensembling).
    `force_tokens` [B/k, T]: teacher forcing; the given tokens are fed instead of sampled ones (their policy
    log-probs are recorded), which scores a completion along the exact path of the decode loop.
    `compile` (default: on CUDA, unless the model is sharded) runs the decode step under CUDA graphs.
    `on_step(t, tokens, alive)`: called after decode step t with that step's tokens and alive mask ([B/k] device
    tensors, one per output row; finished rows hold the pad token and 0); it may return a bool tensor or list [B/k]
    of rows to finish now (cancelled: no more tokens, mask 0 from step t + 1). See `StepHook`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if is_encoder_decoder(model):  # the reference loop, one batch per prefix (rlprefix.seq2seq)
        if on_step is not None:
            raise ValueError("on_step (streaming, cancelling) is not supported on encoder-decoder models")
        return seq2seq.sample(model, tokenizer, prompt_ids, prompt_mask, prefix, bank=bank, prefix_index=prefix_index,
                              kv=kv, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                              generator=generator, row_seeds=row_seeds, decode=decode, return_hidden=return_hidden,
                              groups=groups, force_tokens=force_tokens)
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"the engine passes its own 4D attention mask, which needs attn_implementation 'sdpa' or "
                         f"'eager'; this model uses {attn!r}")
    device = model.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    rows = prompt_ids.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows do not split into ensembles of {groups}")
    out_rows = rows // groups
    bank, index = _resolve_prefixes(model, prefix, kv, bank, prefix_index, rows, prompt_ids, prompt_mask)
    seeds = _row_seeds(row_seeds, out_rows, generator, device) if do_sample and force_tokens is None else None
    compile = device.type == "cuda" and not sharding.is_sharded(model) if compile is None else compile

    batch = bucket(rows) if compile else rows  # padded rows: empty prompts, no prefix, finished from the start
    pmax = bank.max_length if bank else 0
    tp = prompt_ids.shape[1]
    total = pmax + tp + max_new_tokens
    total = -(-total // 64) * 64 if compile else total
    if batch > rows:
        extra = batch - rows
        prompt_ids = torch.cat([prompt_ids, prompt_ids.new_zeros(extra, tp)])
        prompt_mask = torch.cat([prompt_mask, prompt_mask.new_zeros(extra, tp)])
        index = torch.cat([index, index.new_full((extra,), -1)])

    spec, dtype = kv_spec(model), model_dtype(model)
    cache = new_cache(model, batch, total, reuse=compile)
    key_valid, pos, logits, h = open_rows(model, prompt_ids, prompt_mask, bank, index, cache, total, return_hidden)
    step_fn = compiled_step(model) if compile else model_step

    stop, pad = stop_and_pad(model, tokenizer, device)
    tokens = torch.full((out_rows, max_new_tokens), pad, dtype=torch.long, device=device)
    logps = torch.zeros(out_rows, max_new_tokens, device=device)
    alive = torch.zeros(out_rows, max_new_tokens, dtype=torch.long, device=device)
    hidden = torch.zeros(out_rows, max_new_tokens, spec.hidden_size, device=device, dtype=dtype) if return_hidden else None
    done = torch.zeros(out_rows, dtype=torch.bool, device=device)
    counter = torch.zeros((), dtype=torch.long, device=device)
    slot = torch.tensor(pmax + tp, device=device)

    steps = max_new_tokens if force_tokens is None else min(max_new_tokens, force_tokens.shape[1])
    live = None  # once finished rows were dropped (see `_compact`): the output rows still decoded, in batch order
    work = rows  # rows of the model batch that carry output rows (the rest are bucket padding)
    for t in range(steps):
        logits, h = logits[:work], (h[:work] if h is not None else None)
        if t < min_new_tokens:
            logits[:, stop] = float("-inf")
        logp = policy_logprobs(logits, temperature, groups)
        if force_tokens is not None:
            nxt = force_tokens[:, t].to(device)
            nxt = nxt if live is None else nxt[live]
        else:
            nxt = choose(logp, uniforms(seeds, counter) if seeds is not None else None, top_k, top_p)
        lp = logp.gather(-1, nxt.unsqueeze(1)).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        at = slice(None) if live is None else live
        tokens[at, t], alive[at, t] = nxt, (~done).long()
        logps[at, t] = torch.where(done, torch.zeros_like(lp), lp)
        if hidden is not None:
            hidden[at, t] = h.view(-1, groups, h.shape[-1])[:, 0]
        done = done | torch.isin(nxt, stop)
        check = (t + 1) % stop_check_every == 0
        if on_step is not None:
            cancel = on_step(t, tokens[:, t], alive[:, t])
            if cancel is not None:  # the caller knows these rows (host side): look at `done` now
                cancel = torch.as_tensor(cancel, dtype=torch.bool).to(device)
                if cancel.shape != (out_rows,):
                    raise ValueError(f"on_step returned {tuple(cancel.shape)} rows to stop; the batch has {out_rows}")
                done = done | (cancel if live is None else cancel[live])
                check = True
        if t + 1 == steps:
            break
        if check:  # (sharded model: every process decodes until all processes' rows are finished)
            if on_step is None:
                if sharding.agree_all(model, bool(done.all())):
                    break
            else:
                finished = int(done.sum())
                if sharding.agree_all(model, finished == done.shape[0]):
                    break
                if finished and finished < done.shape[0] and not compile:  # free the finished rows' share of every later step
                    keep = (~done).nonzero().squeeze(1)
                    live = keep if live is None else live[keep]
                    pos, key_valid, done, seeds, nxt = _compact(cache, keep, groups, pos, key_valid, done, seeds, nxt)
                    work = live.numel() * groups
        ids = nxt.repeat_interleave(groups)
        if batch > rows:
            ids = torch.cat([ids, ids.new_full((batch - rows,), pad)])
        pos = pos + 1
        if compile:
            torch.compiler.cudagraph_mark_step_begin()
        logits, h = step_fn(model, ids.unsqueeze(1), pos, decode_mask(key_valid, slot, dtype), cache, return_hidden)
        if compile:  # CUDA-graph outputs live in the graph's memory pool and are overwritten by the next replay
            logits, h = logits.clone(), (h.clone() if h is not None else None)
        slot += 1
        counter += 1
    return _rollout(tokenizer, prompt_ids[:rows:groups], prompt_mask[:rows:groups], tokens, alive, logps, hidden,
                    pad, decode)


def _compact(cache, keep: torch.Tensor, groups: int, pos, key_valid, done, seeds, nxt):
    """Drop the finished rows from the batch (eager path): `keep` are the output rows (positions in the current
    batch) still decoded; their cache rows, positions, masks, seeds and last tokens move up. A row's logits do not
    depend on its neighbours, so the kept rows go on as they would have (up to the fp rounding of another batch
    shape, as for any batch)."""
    batch_rows = keep
    if groups > 1:  # an output row is a run of `groups` batch rows
        batch_rows = (keep.unsqueeze(1) * groups + torch.arange(groups, device=keep.device)).flatten()
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, batch_rows)
        layer.values = layer.values.index_select(0, batch_rows)
        layer.batch_size = batch_rows.numel()
    return (pos[batch_rows], key_valid[batch_rows], done[keep], seeds[keep] if seeds is not None else None,
            nxt[keep])


def _rollout(tokenizer, prompt_ids, prompt_mask, tokens, alive, logps, hidden, pad, decode) -> Rollout:
    """Trim to the longest completion (one host sync, after the loop) and decode the texts."""
    width = max(int(alive.sum(1).max()), 1)
    tokens, alive, logps = tokens[:, :width], alive[:, :width], logps[:, :width]
    hidden = hidden[:, :width] if hidden is not None else None
    texts = tokenizer.batch_decode(tokens.masked_fill(alive == 0, pad), skip_special_tokens=True) if decode else []
    return Rollout(prompt_ids, prompt_mask, tokens, alive, logps, texts, hidden)


@torch.no_grad()
def dynamic_bank(model, prefix, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(PrefixBank with one entry per row, index 0..rows-1): an input-conditioned prefix's mixture for each
    prompt, routed on its real tokens, exactly as the warm start routes on the prompt tokens."""
    kv = prefix.key_values(model, prompt_ids, prompt_mask)
    index = torch.arange(kv.shape[0], dtype=torch.long, device=model.device)
    return PrefixBank(model, list(kv.unbind(0))), index


def _resolve_prefixes(model, prefix, kv, bank, prefix_index, rows: int, prompt_ids=None, prompt_mask=None):
    """(bank or None, index LongTensor [rows] on the device) from whichever way the prefixes were given."""
    device = model.device
    given = [x is not None for x in (prefix, kv, bank)]
    if sum(given) > 1:
        raise ValueError("pass one of prefix, kv, or bank + prefix_index")
    if bank is None:
        if prefix_index is not None:
            raise ValueError("prefix_index needs a bank")
        if kv is None and is_input_conditioned(prefix):  # each row its own mixture: the per-row path
            return dynamic_bank(model, prefix, prompt_ids, prompt_mask)
        if kv is None:
            kv = prefix_kv(model, prefix)
        if kv is None or kv.shape[2] == 0:
            return None, torch.full((rows,), -1, dtype=torch.long, device=device)
        return PrefixBank(model, [kv]), torch.zeros(rows, dtype=torch.long, device=device)
    if prefix_index is None:
        raise ValueError("a bank needs prefix_index (LongTensor [rows], -1 = no prefix)")
    index = torch.as_tensor(prefix_index, dtype=torch.long).to(device)
    if index.shape != (rows,):
        raise ValueError(f"prefix_index has shape {tuple(index.shape)}; the batch has {rows} rows")
    if bool(((index < -1) | (index >= len(bank))).any()):
        raise ValueError(f"prefix_index values must be in [-1, {len(bank) - 1}]")
    return bank, index


def _row_seeds(row_seeds, rows: int, generator, device) -> torch.Tensor:
    if row_seeds is None:
        where = generator.device if generator is not None else "cpu"
        row_seeds = torch.randint(0, 2**62, (rows,), generator=generator, device=where).tolist()
    if len(row_seeds) != rows:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {rows} rows")
    return seed_halves(row_seeds, device)


# ----------------------------------------------------------------------------------------------------------
# text in, text out

def generate(model, tokenizer, prompts: list[str], prefix=None, *, ensemble: list | None = None,
             chat: bool | None = None, system: str | None = None, batch_size: int = 32, seed: int | None = None,
             **sample_kw) -> list[str]:
    """Completions for a list of prompts.

    `prefix`: None, one prefix for all prompts, or a list with one prefix (or None) per prompt, batched together.
    `ensemble`: a list of k prefixes whose next-token probabilities are averaged (prompt ensembling).
    With `seed`, prompt i gets row seed (seed, i): its completion does not depend on `batch_size`.
    """
    if ensemble is not None and prefix is not None:
        raise ValueError("pass either prefix or ensemble, not both")
    n = len(prompts)
    if isinstance(prefix, (list, tuple)) and len(prefix) != n:
        raise ValueError(f"got {len(prefix)} prefixes for {n} prompts; pass one prefix (or None) per prompt")
    if ensemble is not None and not ensemble:
        raise ValueError("ensemble needs at least one prefix")
    dynamic = prefix if is_input_conditioned(prefix) else None  # its per-row bank is built for each batch
    bank, index, groups = _plan(model, prefix, ensemble, n) if dynamic is None else (None, None, 1)
    base = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    seeds = [base * 1_000_003 + i for i in range(n)]
    texts: list[str] = []
    for i in range(0, n, batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[i:i + batch_size], chat, system, device=model.device)
        idx = index[i * groups:(i + ids.shape[0]) * groups] if index is not None else None
        roll = sample(model, tokenizer, ids.repeat_interleave(groups, 0), mask.repeat_interleave(groups, 0),
                      dynamic, bank=bank, prefix_index=idx if bank is not None else None, groups=groups,
                      row_seeds=seeds[i:i + batch_size], **sample_kw)
        texts += roll.texts
    return texts


def _plan(model, prefix, ensemble, n: int):
    """(bank, per-row index over n * groups rows, groups) for one prefix, a list of them, or an ensemble."""
    if ensemble is not None:
        bank = PrefixBank(model, {f"ensemble[{j}]": p for j, p in enumerate(ensemble)})
        index = torch.arange(len(ensemble)).repeat(n)
        return bank, index, len(ensemble)
    entries = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix] * n
    unique: dict[int, int] = {}
    names: dict[str, object] = {}
    index = []
    for i, p in enumerate(entries):
        if p is None:
            index.append(-1)
            continue
        if id(p) not in unique:
            unique[id(p)] = len(names)
            names[f"prefixes[{i}]" if isinstance(prefix, (list, tuple)) else "prefix"] = p
        index.append(unique[id(p)])
    if not names:
        return None, torch.full((n,), -1, dtype=torch.long), 1
    return PrefixBank(model, names), torch.tensor(index, dtype=torch.long), 1
