"""Held-out evaluation: reward of completions sampled with (or without) a prefix, and KL to the base model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .data import load_records, require_columns
from .generation import encode_prompts, sample
from .runtime import prefix_kv, score_completions


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
        return self.std / max(len(self.rewards), 1) ** 0.5

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
                    dist=None, on_error: str = "raise", penalty: float = -1.0) -> EvalResult:
    """Sample `samples_per_prompt` completions per prompt with a fixed seed and score them.

    The same seed gives the base model and a prefixed model the same random stream, which makes
    before/after comparisons less noisy. A plain reward is wrapped in a Scorer with `on_error`/`penalty`
    (pass a Scorer to choose otherwise); rows where no reward applies (None -> NaN) are left out of the
    mean and std.
    """
    from rewards import Scorer

    if samples_per_prompt < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {samples_per_prompt}")
    ds = load_records(prompts)
    require_columns(ds, ["prompt"], "evaluation")
    rows = [ds[i] for i in range(len(ds)) for _ in range(samples_per_prompt)]
    seeds = [seed * 1_000_003 + i for i in range(len(rows))]  # one stream per sample, whatever the batching
    if dist is not None and dist.world_size > 1:
        rows, seeds = rows[dist.rank::dist.world_size], seeds[dist.rank::dist.world_size]
    kv = prefix_kv(model, prefix)
    scorer = reward if isinstance(reward, Scorer) else Scorer(reward, on_error=on_error, penalty=penalty)
    rewards, texts, kls = [], [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        p = [r["prompt"] for r in chunk]
        cols = {k: [r[k] for r in chunk] for k in chunk[0] if k != "prompt"}
        ids, mask = encode_prompts(tokenizer, p, chat, system, device=model.device)
        roll = sample(model, tokenizer, ids, mask, kv=kv, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, row_seeds=seeds[i:i + batch_size])
        values, _ = scorer(p, roll.texts, **cols)
        rewards += values.tolist()
        texts += roll.texts
        if kv is not None:
            base = score_completions(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                     roll.completion_mask, temperature=temperature).logprobs
            kls += ((roll.logprobs - base) * roll.completion_mask).sum(1).tolist()
        else:
            kls += [0.0] * len(chunk)
    if dist is not None and dist.world_size > 1:
        rewards, kls = dist.gather_floats(rewards), dist.gather_floats(kls)
    t = torch.tensor(rewards)
    t = t[torch.isfinite(t)]  # rows where no reward applied
    return EvalResult(t.mean().item() if len(t) else math.nan, t.std().item() if len(t) > 1 else 0.0, sum(kls) / max(len(kls), 1), rewards,
                      [r["prompt"] for r in rows], texts)
