"""Reward hygiene for the training loops: catch exceptions and NaN/inf, clip, normalise with running stats.

The running statistics are part of PPO's checkpoint (`state_dict`), so they live here, next to the loops that
save them; the reward contract itself (`check_values`, `RewardError`) is the `rewards` package's.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from rewards.contract import RewardError, check_values

# the metrics a Scorer takes over the global batch when `gather` is set (data-parallel training); the others are
# this process's, for the training loop to average over processes
GLOBAL_METRICS = ("reward/raw_mean", "reward/raw_std")


def raw_stats(values: list[float]) -> dict[str, float]:
    """Mean and std of the finite values: the reward as the user wrote it, before clipping and normalisation
    (rows where no reward applies are NaN and left out; mean 0 without any row, std 0 with fewer than two)."""
    ok = [float(v) for v in values if math.isfinite(v)]
    return {"reward/raw_mean": sum(ok) / max(len(ok), 1),
            "reward/raw_std": float(torch.tensor(ok).std()) if len(ok) > 1 else 0.0}


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
        self.gather = None  # set by data-parallel training: raw and running stats then use the global batch

    def _fail(self, what: str, prompts, completions, index: int | None):
        sample = ""
        if index is not None:
            sample = f" at sample {index} (prompt {prompts[index]!r}, completion {completions[index]!r})"
        return RewardError(f"reward {self.name!r} {what}{sample}")

    def raw(self, prompts: list[str], completions: list[str], **columns) -> tuple[list[float], int, int]:
        """(values, invalid count, none count); a None row (no reward applies) comes back as NaN."""
        try:
            out = self.reward(prompts=prompts, completions=completions, **columns)
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - reward code is user code
            if self.on_error == "raise":
                raise self._fail(f"raised {type(e).__name__}: {e}", prompts, completions, None) from e
            return [self.penalty] * len(completions), len(completions), 0
        checked = check_values(self.name, out, len(completions))  # a contract error always raises
        none = [i for i, v in enumerate(checked) if v is None]
        values = [math.nan if v is None else v for v in checked]
        bad = [i for i, v in enumerate(values) if not math.isfinite(v) and i not in none]
        if bad and self.on_error == "raise":
            raise self._fail(f"returned {values[bad[0]]}", prompts, completions, bad[0])
        for i in bad:
            values[i] = self.penalty
        return values, len(bad), len(none)

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> tuple[torch.Tensor, dict]:
        """Rewards as a float tensor plus metrics.

        Following TRL, a reward may return None for a row it does not apply to; such a row comes back as
        NaN (counted in `reward/none`) and callers leave it out of means and of the loss. Statistics
        (raw mean/std, running normalisation) use the finite rows only, of the global batch when `gather` is set.
        """
        values, invalid, none = self.raw(prompts, completions, **columns)
        self.last_raw = list(values)  # before clipping / normalisation: the reward as written
        self.invalid_total += invalid
        metrics = {**raw_stats(self.gather(values) if self.gather else values),
                   "reward/invalid": invalid, "reward/none": none}
        r = torch.tensor(values, dtype=torch.float32)
        for name, comp in getattr(self.reward, "last_components", {}).items():
            finite = [v for v in comp if v is not None and math.isfinite(v)]
            metrics[f"reward/{name}"] = sum(finite) / max(len(finite), 1)
        if self.clip is not None:
            r = r.clamp(-self.clip, self.clip)
        if self.normalize:
            ok = r[torch.isfinite(r)]
            self.update_stats(torch.tensor(self.gather(ok.tolist())) if self.gather else ok)
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
