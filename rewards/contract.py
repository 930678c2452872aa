"""The reward contract: a reward returns one number (or None, TRL's "does not apply here") per completion.

`check_values` enforces it and names the reward when it is broken. The hygiene the training loops add on top
(exceptions and NaN/inf, clipping, running normalisation) is `rlprefix.train.scorer.Scorer`."""
from __future__ import annotations

import numbers

import torch


class RewardError(RuntimeError):
    """A reward raised or returned a non-finite value; the message names the reward and the sample."""


def _number(x) -> float | None:
    """A float from a number (Python, NumPy or 0-d tensor) or None; anything else raises TypeError."""
    if x is None:
        return None
    if isinstance(x, (str, bytes, dict, list, tuple, set)):
        raise TypeError(x)
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise TypeError(x)
        return float(x.item())
    if isinstance(x, numbers.Real) or (hasattr(x, "dtype") and getattr(x, "shape", None) == ()):
        return float(x)
    raise TypeError(x)


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def check_values(name: str, values, n: int) -> list[float | None]:
    """A reward's output must be a sequence of n numbers (or None, TRL's "does not apply here")."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward {name!r} returned {type(values).__name__} {_short(values)}; a reward must "
                          f"return a list with one number (or None) per completion")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    out = []
    for i, v in enumerate(values):
        try:
            out.append(_number(v))
        except (TypeError, ValueError):
            raise RewardError(f"reward {name!r} returned {type(v).__name__} {_short(v)} for completion {i}; a reward "
                              f"must return a number (or None) per completion") from None
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} values for {n} completions")
    return out
