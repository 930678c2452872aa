"""The rollout engine: fast batched sampling with many prefixes in one batch.

What it does differently from the reference loop (`rlprefix.models.reference_sample`, kept as the oracle in tests):
- one preallocated static KV cache per batch, laid out [prefix slots | prompt | completion];
  the prefix K/V are written into it once (transformers' public `StaticCache.update`);
- per-row prefixes: a `PrefixBank` holds several prefixes, `prefix_index[b]` picks one per row
  (-1 = bare model). Shorter prefixes are padded and masked out; real tokens of row b take positions
  len_b, len_b+1, ... (the PEFT convention of `models.decoder_only.position_ids`), so a row gives the same logits
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

The bank of prefixes is rlprefix/decoding/bank.py, the static cache and the model step static_cache.py; this module is
the decode loop (`sample`) and text in, text out (`generate`). A family without the engine (encoder-decoder models)
runs its reference loop, one batch per prefix.

Log-probabilities are those of the policy softmax(logits / T), not of the top-k/top-p warped distribution,
exactly as in the reference loop; with an ensemble they are of the averaged policy.
"""
from __future__ import annotations

from typing import Callable

import torch

from rlprefix.decoding.bank import PrefixBank, plan_rows, resolve_prefixes
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.decoding.static_cache import bucket, compiled_step, decode_mask, model_step, new_cache, open_rows
from rlprefix.distributed import collectives as sharding
from rlprefix.images.conditions import is_image_prefix, with_images
from rlprefix.models import family_of
from rlprefix.models.sampling import Rollout, choose, model_dtype, policy_logprobs, seed_halves, stop_and_pad, uniforms
from rlprefix.models.spec import kv_spec
from rlprefix.prefixes.dynamic import is_input_conditioned

StepHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | list[bool] | None"]
"""`sample(on_step=...)`: (step t, tokens [B/k], alive [B/k]) -> rows to finish now, or None.

Called after every decode step, on the thread running `sample`. The tensors live on the model's device: reading
them (`.tolist()`) is a host sync, which the hook pays only when it needs the tokens (streaming); returning None
costs nothing. Returned rows count as finished from the next step on (no tokens, mask 0); rows already finished
may be included. Returning rows also makes the engine look at which rows are done right away (one sync): when all
are, the loop ends; otherwise, on the eager path, the finished rows are dropped from the batch so later steps no
longer compute them (under CUDA graphs, `compile=True`, the batch keeps its bucketed shape and they idle).
"""


@sharding.decode_loop
@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix=None, *,
           bank: PrefixBank | None = None, prefix_index: torch.Tensor | None = None, kv: torch.Tensor | None = None,
           max_new_tokens: int = 64, min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, do_sample: bool = True, generator: torch.Generator | None = None,
           row_seeds: list[int] | None = None, decode: bool = True, return_hidden: bool = False,
           stop_check_every: int = 8, groups: int = 1, force_tokens: torch.Tensor | None = None,
           compile: bool | None = None, on_step: StepHook | None = None) -> Rollout:
    """Sample completions for left-padded prompts; same keywords and `Rollout` as `rlprefix.models.reference_sample`.

    Prefixes: `prefix` or `kv` (one for every row), or `bank` + `prefix_index` (LongTensor [B], -1 = none).
    `groups` = k > 1: rows come in runs of k (the same prompt, k prefixes); their next-token probabilities are
    averaged, one token is sampled per run and the Rollout has one row per run (prompt ensembling).
    `force_tokens` [B/k, T]: teacher forcing; the given tokens are fed instead of sampled ones (their policy
    log-probs are recorded), which scores a completion along the exact path of the decode loop. `compile` (default:
    on CUDA, unless the model is sharded) runs the decode step under CUDA graphs.
    `on_step(t, tokens, alive)`: called after decode step t with that step's tokens and alive mask ([B/k] device
    tensors, one per output row; finished rows hold the pad token and 0); it may return a bool tensor or list [B/k]
    of rows to finish now (cancelled: no more tokens, mask 0 from step t + 1). See `StepHook`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    family = family_of(model)
    if not family.supports("engine"):  # the family's reference loop, one batch per prefix
        if on_step is not None:
            family.require("on_step", model)
        return family.sample(model, tokenizer, prompt_ids, prompt_mask, prefix, bank=bank, prefix_index=prefix_index,
                             kv=kv, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, top_k=top_k,
                             temperature=temperature, top_p=top_p, do_sample=do_sample, generator=generator,
                             row_seeds=row_seeds, decode=decode, return_hidden=return_hidden, groups=groups,
                             force_tokens=force_tokens)
    _check_attention(model)  # 1. the rows: which prefix each carries, their seeds
    device = model.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    rows = prompt_ids.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows do not split into ensembles of {groups}")
    bank, index = resolve_prefixes(model, prefix, kv, bank, prefix_index, rows, prompt_ids, prompt_mask)
    seeds = _row_seeds(row_seeds, rows // groups, generator, device) if do_sample and force_tokens is None else None
    compile = device.type == "cuda" and not sharding.is_sharded(model) if compile is None else compile
    loop = _Loop(model, tokenizer, prompt_ids, prompt_mask, bank, index, groups=groups, seeds=seeds,  # 2. the cache
                 max_new_tokens=max_new_tokens, compile=compile, return_hidden=return_hidden)
    # 3. one token per step until every row has stopped
    steps = max_new_tokens if force_tokens is None else min(max_new_tokens, force_tokens.shape[1])
    for t in range(steps):
        nxt, lp, h = loop.choose(t, min_new_tokens, temperature, top_k, top_p, force_tokens)
        nxt = loop.record(t, nxt, lp, h)
        check = (t + 1) % stop_check_every == 0
        if on_step is not None:
            cancel = on_step(t, loop.tokens[:, t], loop.alive[:, t])
            if cancel is not None:  # the caller knows these rows (host side): look at `done` now
                loop.cancel(cancel)
                check = True
        if t + 1 == steps:
            break
        if check:  # (sharded model: every process decodes until all processes' rows are finished)
            if loop.all_done(compact=on_step is not None):
                break
            nxt = loop.last
        loop.advance(nxt)
    return loop.rollout(tokenizer, decode)


def _check_attention(model) -> None:
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"the engine passes its own 4D attention mask, which needs attn_implementation 'sdpa' or "
                         f"'eager'; this model uses {attn!r}")


class _Loop:
    """One engine batch being decoded: the model side (static cache, positions, key masks; rows padded to a power of
    two under `compile`, the padding rows empty and finished from the start) and what is recorded per output row
    (one per run of `groups` rows)."""

    def __init__(self, model, tokenizer, prompt_ids, prompt_mask, bank, index, *, groups: int, seeds,
                 max_new_tokens: int, compile: bool, return_hidden: bool):
        device, rows = model.device, prompt_ids.shape[0]
        self.model, self.groups, self.seeds, self.compile = model, groups, seeds, compile
        self.rows, out_rows = rows, rows // groups
        self.batch = bucket(rows) if compile else rows
        pmax, tp = (bank.max_length if bank else 0), prompt_ids.shape[1]
        total = pmax + tp + max_new_tokens
        total = -(-total // 64) * 64 if compile else total
        if self.batch > rows:
            extra = self.batch - rows
            prompt_ids = torch.cat([prompt_ids, prompt_ids.new_zeros(extra, tp)])
            prompt_mask = torch.cat([prompt_mask, prompt_mask.new_zeros(extra, tp)])
            index = torch.cat([index, index.new_full((extra,), -1)])
        self.prompt_ids, self.prompt_mask = prompt_ids[:rows:groups], prompt_mask[:rows:groups]
        self.dtype = model_dtype(model)
        self.cache = new_cache(model, self.batch, total, reuse=compile)
        self.key_valid, self.pos, self.logits, self.h = open_rows(model, prompt_ids, prompt_mask, bank, index,
                                                                  self.cache, total, return_hidden)
        self.step_fn = compiled_step(model) if compile else model_step
        self.stop, self.pad = stop_and_pad(model, tokenizer, device)
        self.tokens = torch.full((out_rows, max_new_tokens), self.pad, dtype=torch.long, device=device)
        self.logps = torch.zeros(out_rows, max_new_tokens, device=device)
        self.alive = torch.zeros(out_rows, max_new_tokens, dtype=torch.long, device=device)
        self.hidden = torch.zeros(out_rows, max_new_tokens, kv_spec(model).hidden_size, device=device,
                                  dtype=self.dtype) if return_hidden else None
        self.done = torch.zeros(out_rows, dtype=torch.bool, device=device)
        self.counter = torch.zeros((), dtype=torch.long, device=device)
        self.slot = torch.tensor(pmax + tp, device=device)
        self.live = None  # once finished rows were dropped (`all_done`): the output rows still decoded, in batch order
        self.work = rows  # rows of the model batch that carry output rows (the rest are bucket padding)
        self.last = None

    def choose(self, t, min_new_tokens, temperature, top_k, top_p, force_tokens):
        """(next token, its policy log-prob, the hidden state that chose it) per decoded output row."""
        logits, h = self.logits[:self.work], (self.h[:self.work] if self.h is not None else None)
        if t < min_new_tokens:
            logits[:, self.stop] = float("-inf")
        logp = policy_logprobs(logits, temperature, self.groups)
        if force_tokens is not None:
            nxt = force_tokens[:, t].to(logits.device)
            nxt = nxt if self.live is None else nxt[self.live]
        else:
            nxt = choose(logp, uniforms(self.seeds, self.counter) if self.seeds is not None else None, top_k, top_p)
        return nxt, logp.gather(-1, nxt.unsqueeze(1)).squeeze(1), h

    def record(self, t, nxt, lp, h):
        """Record step t (finished rows get the pad token, log-prob 0, mask 0); returns the tokens to feed next."""
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad), nxt)
        at = slice(None) if self.live is None else self.live
        self.tokens[at, t], self.alive[at, t] = nxt, (~self.done).long()
        self.logps[at, t] = torch.where(self.done, torch.zeros_like(lp), lp)
        if self.hidden is not None:
            self.hidden[at, t] = h.view(-1, self.groups, h.shape[-1])[:, 0]
        self.done = self.done | torch.isin(nxt, self.stop)
        self.last = nxt
        return nxt

    def cancel(self, cancel) -> None:
        cancel = torch.as_tensor(cancel, dtype=torch.bool).to(self.done.device)
        if cancel.shape != (self.tokens.shape[0],):
            raise ValueError(f"on_step returned {tuple(cancel.shape)} rows to stop; the batch has "
                             f"{self.tokens.shape[0]}")
        self.done = self.done | (cancel if self.live is None else cancel[self.live])

    def all_done(self, compact: bool) -> bool:
        """Whether every row (of every process, when sharded) has finished. With `compact` (the eager path) the
        finished rows are dropped from the batch, so later steps no longer compute them."""
        if not compact:
            return sharding.agree_all(self.model, bool(self.done.all()))
        finished = int(self.done.sum())
        if sharding.agree_all(self.model, finished == self.done.shape[0]):
            return True
        if finished and finished < self.done.shape[0] and not self.compile:
            keep = (~self.done).nonzero().squeeze(1)
            self.live = keep if self.live is None else self.live[keep]
            self.pos, self.key_valid, self.done, self.seeds, self.last = _compact(
                self.cache, keep, self.groups, self.pos, self.key_valid, self.done, self.seeds, self.last)
            self.work = self.live.numel() * self.groups
        return False

    def advance(self, nxt) -> None:
        """Feed one token per row through the model (its logits and hidden state wait for the next `choose`)."""
        ids = nxt.repeat_interleave(self.groups)
        if self.batch > self.rows:
            ids = torch.cat([ids, ids.new_full((self.batch - self.rows,), self.pad)])
        self.pos = self.pos + 1
        if self.compile:
            torch.compiler.cudagraph_mark_step_begin()
        logits, h = self.step_fn(self.model, ids.unsqueeze(1), self.pos, decode_mask(self.key_valid, self.slot,
                                 self.dtype), self.cache, self.hidden is not None)
        if self.compile:  # CUDA-graph outputs live in the graph's memory pool and are overwritten by the next replay
            logits, h = logits.clone(), (h.clone() if h is not None else None)
        self.logits, self.h = logits, h
        self.slot += 1
        self.counter += 1

    def rollout(self, tokenizer, decode: bool) -> Rollout:
        return _rollout(tokenizer, self.prompt_ids, self.prompt_mask, self.tokens, self.alive, self.logps,
                        self.hidden, self.pad, decode)


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


def _row_seeds(row_seeds, rows: int, generator, device) -> torch.Tensor:
    if row_seeds is None:
        where = generator.device if generator is not None else "cpu"
        row_seeds = torch.randint(0, 2**62, (rows,), generator=generator, device=where).tolist()
    if len(row_seeds) != rows:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {rows} rows")
    return seed_halves(row_seeds, device)


# ---- text in, text out ------------------------------------------------------------------------------------------
def generate(model, tokenizer, prompts: list[str], prefix=None, *, ensemble: list | None = None,
             chat: bool | None = None, system: str | None = None, batch_size: int = 32, seed: int | None = None,
             images: list | None = None, **sample_kw) -> list[str]:
    """Completions for a list of prompts.

    `prefix`: None, one prefix for all prompts, or a list with one prefix (or None) per prompt, batched together.
    `ensemble`: a list of k prefixes whose next-token probabilities are averaged (prompt ensembling).
    `images`: one image per prompt (PIL, path or bytes) for an image prefix (kind image), which needs them.
    With `seed`, prompt i gets row seed (seed, i): its completion does not depend on `batch_size`.
    """
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
    if images is not None or is_image_prefix(prefix):
        prefix = with_images(prefix, images)
    if ensemble is not None and prefix is not None:
        raise ValueError("pass either prefix or ensemble, not both")
    n = len(prompts)
    if isinstance(prefix, (list, tuple)) and len(prefix) != n:
        raise ValueError(f"got {len(prefix)} prefixes for {n} prompts; pass one prefix (or None) per prompt")
    if ensemble is not None and not ensemble:
        raise ValueError("ensemble needs at least one prefix")
    dynamic = prefix if is_input_conditioned(prefix) else None  # its per-row bank is built for each batch
    bank, index, groups = plan_rows(model, prefix, ensemble, n) if dynamic is None else (None, None, 1)
    base = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    seeds = [base * 1_000_003 + i for i in range(n)]
    texts: list[str] = []
    for i in range(0, n, batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[i:i + batch_size], chat, system, device=model.device)
        idx = index[i * groups:(i + ids.shape[0]) * groups] if index is not None else None
        part = dynamic.select(range(i, i + ids.shape[0])) if hasattr(dynamic, "select") else dynamic
        roll = sample(model, tokenizer, ids.repeat_interleave(groups, 0), mask.repeat_interleave(groups, 0),
                      part, bank=bank, prefix_index=idx if bank is not None else None, groups=groups,
                      row_seeds=seeds[i:i + batch_size], **sample_kw)
        texts += roll.texts
    return texts
