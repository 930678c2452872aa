"""The sampling maths both model families and the rollout engine use; nothing here runs a model.

Caches back to K/V, log-probabilities, the records a forward pass and a sampling loop return, the one pad/EOS rule,
top-k/top-p filtering, the one inverse-CDF sampler (fed by per-row `torch.Generator`s in the reference loops and by
counter-based uniforms in the rollout engine), and the per-token choice of the decode loops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlprefix.models.spec import KVSpec

M32 = 0xFFFFFFFF


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


# ---- caches back to K/V ------------------------------------------------------------------------------------------
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


# ---- log-probabilities and what a forward pass returns -----------------------------------------------------------
def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), gathered per position."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class ForwardOutput:
    logits: torch.Tensor               # [B, T_kept, V]
    hidden: torch.Tensor | None        # [B, T_kept, H], final hidden states (after the final norm)


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


# ---- sampling: the record of a batch, and the choice of each token -----------------------------------------------
@dataclass
class Rollout:
    prompt_ids: torch.Tensor        # [B, Tp] left-padded (an encoder-decoder model's sources: right-padded)
    prompt_mask: torch.Tensor       # [B, Tp]
    completion_ids: torch.Tensor    # [B, Tc] right-padded with pad_token_id after EOS
    completion_mask: torch.Tensor   # [B, Tc] 1 for sampled tokens (EOS included), 0 after
    logprobs: torch.Tensor          # [B, Tc] log p_T(token) at sampling time (0 where masked)
    texts: list[str] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [B, Tc, H] final hidden state that predicted each token (return_hidden)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)


def eos_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id of the model's generation config and the tokenizer, sorted."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None else None
    for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


def pad_token_id(tokenizer, model=None) -> int:
    """The one pad rule (padding, finished rows, collated batches): the tokenizer's pad token, else the smallest of
    the end-of-sequence ids (`eos_ids`), else 0. (`load_model` sets a missing pad token to EOS.)"""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    stop = eos_ids(model, tokenizer)
    return stop[0] if stop else 0


def stop_and_pad(model, tokenizer, device) -> tuple[torch.Tensor, int]:
    """The decode loops' end-of-sequence ids (a device tensor) and the token that fills finished rows."""
    return torch.tensor(eos_ids(model, tokenizer), device=device), pad_token_id(tokenizer, model)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering (masked logits set to -inf)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [B, V] (not necessarily normalised) for uniforms `u` [B] in (0, 1)."""
    cdf = probs.cumsum(-1)
    nxt = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return nxt.clamp(max=probs.shape[-1] - 1)


def row_generators(row_seeds: list[int] | None, batch: int) -> list[torch.Generator] | None:
    """One CPU generator per row (None without seeds): a row's sample then depends only on its own seed."""
    if row_seeds is None:
        return None
    if len(row_seeds) != batch:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {batch} rows")
    return [torch.Generator().manual_seed(int(s) % (2**63)) for s in row_seeds]


def next_tokens(logits: torch.Tensor, stop: torch.Tensor, block_stop: bool, do_sample: bool, temperature: float,
                top_k: int, top_p: float, row_gens: list[torch.Generator] | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row from float logits [B, V] (modified in place when `block_stop`: no EOS yet)."""
    if block_stop:
        logits[:, stop] = float("-inf")
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    if row_gens is not None:  # one uniform draw per row from its own stream
        return inverse_cdf(probs, torch.cat([torch.rand(1, generator=g) for g in row_gens]).to(logits.device))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---- counter-based randomness (the rollout engine): uniform(seed, token index) from integer hashing -----------

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


# ---- the rollout engine's choice of the next token (all on the device) -----------------------------------------

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
    return inverse_cdf(torch.softmax(filter_logits(logp, top_k, top_p), dim=-1), u)


class DecodeRecord:
    """What a reference decode loop keeps per step, for the decoder-only reference loop (`models.decoder_only.sample`) and the encoder-decoder loop
    (`seq2seq`): a finished row is fed the pad token and records log-prob 0 and mask 0 from the step after its
    stop token."""

    def __init__(self, batch: int, stop: torch.Tensor, pad: int):
        self.stop, self.pad = stop, pad
        self.done = torch.zeros(batch, dtype=torch.bool, device=stop.device)
        self.tokens, self.logps, self.alive, self.hiddens = [], [], [], []

    def add(self, nxt: torch.Tensor, lp: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Record one step's tokens and their log-probs (and the hidden state that chose them); returns the tokens
        to feed next (the pad token for finished rows)."""
        if hidden is not None:
            self.hiddens.append(hidden)
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad), nxt)
        self.alive.append(~self.done)
        self.tokens.append(nxt)
        self.logps.append(torch.where(self.done, torch.zeros_like(lp), lp))
        self.done = self.done | torch.isin(nxt, self.stop)
        return nxt

    def rollout(self, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, decode: bool) -> Rollout:
        completion = torch.stack(self.tokens, 1)
        mask = torch.stack(self.alive, 1).long()
        texts = tokenizer.batch_decode(completion.masked_fill(mask == 0, self.pad),
                                       skip_special_tokens=True) if decode else []
        hidden = torch.stack(self.hiddens, 1) if self.hiddens else None
        return Rollout(prompt_ids, prompt_mask, completion, mask, torch.stack(self.logps, 1), texts, hidden)
