"""Reward hygiene for training loops: catch exceptions and NaN/inf, clip, normalise with running stats."""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch


class RewardError(RuntimeError):
    """A reward raised or returned a non-finite value; the message names the reward and the sample."""


class Scorer:
    """Calls a reward on a batch and returns a tensor plus metrics.

    on_error="raise": stop with a RewardError naming the reward and the offending sample.
    on_error="penalty": replace the bad value(s) by `penalty` and count them (`reward/invalid`).
    `clip` bounds rewards to [-clip, clip]; `normalize` whitens with running mean/std (Welford), whose
    state is checkpointed (`state_dict`).
    """

    def __init__(self, reward: Callable, *, name: str | None = None, on_error: Literal["raise", "penalty"] = "raise",
                 penalty: float = -1.0, clip: float | None = None, normalize: bool = False):
        if on_error not in ("raise", "penalty"):
            raise ValueError(f"on_error must be 'raise' or 'penalty', got {on_error!r}")
        self.reward, self.on_error, self.penalty, self.clip, self.normalize = reward, on_error, penalty, clip, normalize
        self.name = name or getattr(reward, "__name__", type(reward).__name__)
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.invalid_total = 0
        self.last_raw: list[float] = []
        self.gather = None  # set by data-parallel training: running stats then use the global batch

    def _fail(self, what: str, prompts, completions, index: int | None):
        sample = ""
        if index is not None:
            sample = f" at sample {index} (prompt {prompts[index]!r}, completion {completions[index]!r})"
        return RewardError(f"reward {self.name!r} {what}{sample}")

    def raw(self, prompts: list[str], completions: list[str], **columns) -> tuple[list[float], int]:
        try:
            values = self.reward(prompts=prompts, completions=completions, **columns)
            values = [float(v) if v is not None else math.nan for v in values]
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - reward code is user code
            if self.on_error == "raise":
                raise self._fail(f"raised {type(e).__name__}: {e}", prompts, completions, None) from e
            return [self.penalty] * len(completions), len(completions)
        if len(values) != len(completions):
            raise self._fail(f"returned {len(values)} values for {len(completions)} completions", prompts,
                             completions, None)
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad and self.on_error == "raise":
            raise self._fail(f"returned {values[bad[0]]}", prompts, completions, bad[0])
        for i in bad:
            values[i] = self.penalty
        return values, len(bad)

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> tuple[torch.Tensor, dict]:
        values, invalid = self.raw(prompts, completions, **columns)
        self.last_raw = list(values)  # before clipping / normalisation, for logging the reward as written
        self.invalid_total += invalid
        r = torch.tensor(values, dtype=torch.float32)
        metrics = {"reward/raw_mean": r.mean().item(), "reward/raw_std": r.std().item() if len(r) > 1 else 0.0,
                   "reward/invalid": invalid}
        for name, comp in getattr(self.reward, "last_components", {}).items():
            metrics[f"reward/{name}"] = sum(comp) / max(len(comp), 1)
        if self.clip is not None:
            r = r.clamp(-self.clip, self.clip)
        if self.normalize:
            self.update_stats(torch.tensor(self.gather(r.tolist())) if self.gather else r)
            r = (r - self.mean) / (math.sqrt(self.m2 / max(self.count - 1, 1)) + 1e-8)
        return r, metrics

    def update_stats(self, r: torch.Tensor) -> None:
        """Welford update; with several processes, pass the gathered global batch."""
        for x in r.tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "invalid_total": self.invalid_total}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
        self.invalid_total = int(state.get("invalid_total", 0))
