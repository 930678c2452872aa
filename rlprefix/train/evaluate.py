"""Held-out evaluation: reward of completions sampled with (or without) a prefix, and KL to the base model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlprefix.distributed import collectives as sharding
from rlprefix.train.data import load_records, require_columns
from rlprefix.prefixes.dynamic import is_input_conditioned, refusal
from rlprefix.decoding.bank import PrefixBank
from rlprefix.images.conditions import image_column, is_image_prefix, with_images
from rlprefix.decoding.engine import sample
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.adapter import score_completions
from rlprefix.train.scorer import Scorer
from rlprefix.seeds import derive_seed


@dataclass
class EvalResult:
    mean: float
    std: float
    kl: float                          # mean per-sequence KL(policy || base) on the sampled tokens
    rewards: list[float] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)

    @property
    def se(self) -> float:
        """Standard error of the mean reward: the sampling noise of this evaluation."""
        n = sum(1 for r in self.rewards if math.isfinite(r))
        return self.std / max(n, 1) ** 0.5

    def as_dict(self, samples: int = 0) -> dict:
        out = {"reward_mean": self.mean, "reward_std": self.std, "reward_se": self.se, "kl_to_base": self.kl,
               "n": len(self.rewards)}
        if samples:
            out["samples"] = [{"prompt": p, "completion": c, "reward": r} for p, c, r in
                              list(zip(self.prompts, self.completions, self.rewards))[:samples]]
        return out


@torch.no_grad()
def evaluate_reward(model, tokenizer, prefix, prompts, reward, *, chat: bool | None = None,
                    system: str | None = None, seed: int = 0, max_new_tokens: int = 40, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, batch_size: int = 32, samples_per_prompt: int = 1,
                    dist=None, on_error: str = "raise", penalty: float = -1.0):
    """Sample `samples_per_prompt` completions per prompt with a fixed seed and score them.

    The same seed gives the base model and a prefixed model the same random stream, which makes
    before/after comparisons less noisy. `prefix` may also be a list or a dict of prefixes (None = the
    base model): they are evaluated together in one pass (each batch carries every prefix, on the rollout
    engine's per-row prefixes), and a list or dict of EvalResult comes back. A plain reward is wrapped in a
    Scorer with `on_error`/`penalty` (pass a Scorer to choose otherwise); rows where no reward applies
    (None -> NaN) are left out of the mean and std.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {samples_per_prompt}")
    named = prefix if isinstance(prefix, dict) else dict(enumerate(prefix)) if isinstance(prefix, list) else {0: prefix}
    ds = load_records(prompts)
    require_columns(ds, ["prompt"], "evaluation")
    rows = [ds[i] for i in range(len(ds)) for _ in range(samples_per_prompt)]
    seeds = [derive_seed("eval", seed, i) for i in range(len(rows))]  # a stream per sample, whatever the batching
    if dist is not None and dist.world_size > 1:
        rows, seeds = rows[dist.rank::dist.world_size], seeds[dist.rank::dist.world_size]
    scorer = reward if isinstance(reward, Scorer) else Scorer(reward, on_error=on_error, penalty=penalty)
    keys = list(named)
    dynamic = _dynamic(named)  # an input-conditioned prefix: the engine builds each batch's per-row bank
    bank, slots = _bank(model, named) if dynamic is None else (None, {k: 0 for k in named})
    per = max(1, batch_size // len(keys))
    acc = {k: ([], [], []) for k in keys}  # rewards, texts, kls
    sample_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    for i in sharding.padding_starts(model, dist, len(rows), per):
        if i is None:  # sharded model, this process is out of rows: the work of one throwaway row, results dropped
            _batch(model, tokenizer, [ds[0]], [0], scorer, dynamic, bank, slots, keys, chat, system, sample_kw)
            continue
        chunk = rows[i:i + per]
        scored = _batch(model, tokenizer, chunk, seeds[i:i + len(chunk)], scorer, dynamic, bank, slots, keys, chat,
                        system, sample_kw)
        for k, parts in scored.items():
            for into, part in zip(acc[k], parts):
                into.extend(part)
    results = {k: _result(acc[k][0], acc[k][2], acc[k][1], rows, dist) for k in keys}
    if isinstance(prefix, dict):
        return results
    if isinstance(prefix, list):
        return [results[k] for k in keys]
    return results[0]


def _batch(model, tokenizer, chunk: list[dict], seeds: list[int], scorer, dynamic, bank, slots, keys, chat, system,
           sample_kw: dict) -> dict:
    """Every evaluated prefix on every row of `chunk` in one engine batch: per key (rewards, texts, KLs to the
    base). A sharded model's process that is out of rows runs it on a throwaway row, so its collectives (and a
    reward that runs the model, such as `fluency`) stay in step with the other processes."""
    p = [r["prompt"] for r in chunk]
    cols = {k: [r[k] for r in chunk] for k in chunk[0] if k != "prompt"}
    ids, mask = encode_prompts(tokenizer, p, chat, system, device=model.device)
    if is_image_prefix(dynamic):  # each row's image through the prefix's encoder
        dynamic = with_images(dynamic, image_column(cols))
    n = len(chunk)
    index = torch.tensor([slots[k] for k in keys]).repeat_interleave(n)
    roll = sample(model, tokenizer, ids.repeat(len(keys), 1), mask.repeat(len(keys), 1), dynamic, bank=bank,
                  prefix_index=index if bank is not None else None, row_seeds=seeds * len(keys), **sample_kw)
    kls = _kl_to_base(model, roll, index, sample_kw["temperature"])
    out = {}
    for j, k in enumerate(keys):
        texts = roll.texts[j * n:(j + 1) * n]
        values, _ = scorer(p, texts, **cols)
        out[k] = (values.tolist(), texts, kls[j * n:(j + 1) * n])
    return out


def _dynamic(named: dict):
    """The input-conditioned prefix when it is the one prefix evaluated (it cannot share a bank), else None."""
    dynamic = [p for p in named.values() if is_input_conditioned(p)]
    if dynamic and len(named) > 1:
        raise ValueError(refusal("bank", "evaluate_reward"))
    return dynamic[0] if dynamic else None


def _bank(model, named: dict):
    """A PrefixBank of the non-None prefixes and each key's slot in it (-1 for the base model)."""
    present = {k: p for k, p in named.items() if p is not None and getattr(p, "length", 1) != 0}
    if not present:
        return None, {k: -1 for k in named}
    bank = PrefixBank(model, {str(k): p for k, p in present.items()})
    return bank, {k: (bank.index(str(k)) if k in present else -1) for k in named}


def _kl_to_base(model, roll, index: torch.Tensor, temperature: float) -> list[float]:
    """Per-row KL(policy || base) on the sampled tokens; 0 for rows sampled without a prefix."""
    with_prefix = (index >= 0).to(roll.completion_mask.device)
    if not bool(with_prefix.any()):
        return [0.0] * len(index)
    base = score_completions(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                             temperature=temperature).logprobs
    kl = ((roll.logprobs - base) * roll.completion_mask).sum(1)
    return torch.where(with_prefix, kl, torch.zeros_like(kl)).tolist()


def _result(rewards, kls, texts, rows, dist) -> EvalResult:
    if dist is not None and dist.world_size > 1:
        rewards, kls = dist.gather_floats(rewards), dist.gather_floats(kls)
    t = torch.tensor(rewards)
    t = t[torch.isfinite(t)]  # rows where no reward applied
    return EvalResult(t.mean().item() if len(t) else math.nan, t.std().item() if len(t) > 1 else 0.0, sum(kls) / max(len(kls), 1), rewards,
                      [r["prompt"] for r in rows], texts)
