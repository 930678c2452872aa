"""Weighted sums of rewards, keeping each component's values for logging."""
from __future__ import annotations

from typing import Callable

from .contract import check_values
from .registry import build_reward, register


class Composite:
    """total = sum_i weight_i * reward_i(prompts, completions, **columns); components kept in `last_components`."""

    def __init__(self, components: list[tuple[str, Callable, float]]):
        if not components:
            raise ValueError("a composite reward needs at least one component")
        self.components = components
        self.last_components: dict[str, list[float]] = {}
        self.__name__ = "composite"

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        """Weighted sum per row; a component's None (TRL: "does not apply here") is left out of the sum, and a
        row where every component is None is None."""
        total: list[float | None] = [None] * len(completions)
        self.last_components = {}
        for name, fn, weight in self.components:
            values = check_values(name, fn(prompts=prompts, completions=completions, **columns), len(completions))
            self.last_components[name] = values
            total = [t if v is None else (t or 0.0) + weight * v for t, v in zip(total, values)]
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
