"""Stop training at the first non-finite number, so a diverged run never overwrites good results."""
from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """A loss, gradient or prefix became NaN/inf; the message names what and the step."""


def _finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x.detach()).all())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    return math.isfinite(float(x))


def assert_finite(what: str, step: int, *values) -> None:
    """Raise NonFiniteError unless every tensor / float in `values` is finite."""
    if not all(_finite(v) for v in values):
        raise NonFiniteError(f"{what} became non-finite (NaN/inf) at step {step}; stopped without saving it. "
                             f"The last good checkpoint is kept; lower the learning rate (or check the data / "
                             f"reward) and rerun")
