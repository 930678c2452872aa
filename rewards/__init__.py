"""Reward functions for rlprefix, with TRL's contract: `reward(prompts, completions, **columns) -> list[float]`.

Extra dataset columns arrive as keyword lists (one value per completion); unknown keywords are ignored,
so every reward here can be handed to `trl.GRPOTrainer(reward_funcs=...)` unchanged.

Build rewards by name (`build_reward("sentiment")`), by dotted path (`"my_pkg.mod:my_reward"`), or pass
any callable. `composite` makes weighted sums; `check_values` is the contract every reward meets. The hygiene
the training loops add (NaN/exception handling, clipping, running normalisation) is `rlprefix.train.scorer.Scorer`:
this package does not import rlprefix.
"""
from __future__ import annotations

from .base import Reward, as_text
from .registry import REGISTRY, build_reward, load_callable, register
from .composite import Composite
from .contract import RewardError, check_values
from . import builtin, images  # noqa: F401  (registers the built-ins)

__all__ = ["Reward", "as_text", "REGISTRY", "build_reward", "load_callable", "register", "Composite",
           "RewardError", "check_values"]
