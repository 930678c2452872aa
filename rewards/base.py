"""The reward base class: a named, batched callable with TRL's signature."""
from __future__ import annotations


def as_text(completion) -> str:
    """A completion as plain text; TRL passes conversational completions as lists of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


class Reward:
    """Subclass and implement `score(prompts, completions, **columns)`; `__call__` normalises inputs."""

    name = "reward"

    def __init__(self):
        self.__name__ = self.name  # TRL names reward columns after __name__

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        if completions is None:
            raise TypeError(f"reward {self.name!r} needs completions")
        completions = [as_text(c) for c in completions]
        prompts = [as_text(p) for p in prompts] if prompts is not None else [""] * len(completions)
        return [None if x is None else float(x) for x in self.score(prompts, completions, **columns)]

    def score(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        raise NotImplementedError
