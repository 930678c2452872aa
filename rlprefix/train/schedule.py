"""Learning-rate schedule: linear warm-up, then cosine or linear decay (a pure function of the step)."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, lr: float, warmup: int, decay: str = "cosine", min_ratio: float = 0.1) -> float:
    """LR for optimiser step `step` (0-based) of `total`. Stateless, so resuming needs no scheduler state."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        scale = 1.0 - progress
    elif decay == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr decay {decay!r}; use cosine, linear or constant")
    return lr * (min_ratio + (1.0 - min_ratio) * scale)
