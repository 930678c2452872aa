"""Weighted sums of rewards, keeping each component's values for logging."""
from __future__ import annotations

from typing import Callable

from .registry import build_reward, register


class Composite:
    """total = sum_i weight_i * reward_i(prompts, completions, **columns); components kept in `last_components`."""

    def __init__(self, components: list[tuple[str, Callable, float]]):
        if not components:
            raise ValueError("a composite reward needs at least one component")
        self.components = components
        self.last_components: dict[str, list[float]] = {}
        self.__name__ = "composite"

    def __call__(self, prompts=None, completions=None, **columns) -> list[float]:
        total = [0.0] * len(completions)
        self.last_components = {}
        for name, fn, weight in self.components:
            values = [float(v) for v in fn(prompts=prompts, completions=completions, **columns)]
            if len(values) != len(completions):
                raise ValueError(f"reward component {name!r} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            self.last_components[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        return total


@register("composite")
def composite(components: list, model=None, tokenizer=None, device=None) -> Composite:
    """components: [{"name": "sentiment", "weight": 1.0, ...options}, ...]."""
    built = []
    context = {"model": model, "tokenizer": tokenizer, "device": device}
    for i, comp in enumerate(components):
        comp = dict(comp)
        weight = float(comp.pop("weight", 1.0))
        label = comp.pop("label", None) or str(comp.get("name", f"component{i}"))
        built.append((label, build_reward(comp, context), weight))
    return Composite(built)
