"""Image-aware rewards: rule-based caption correctness for the built-in image tasks.

The vocabulary of the built-in tasks (colours, shapes, positions, digit words) is defined here, once: the data
generator (`rlprefix.images.data`) draws its scenes and writes its captions from it, and the reward reads the
reference caption's attributes back with it. Rewards receive the images TRL-style among the keyword columns
(`images=`); this one needs only the reference captions (`captions=` or `caption=`), so it also runs under
`trl.GRPOTrainer` unchanged.
"""
from __future__ import annotations

import re

from .base import Reward
from .registry import register

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SYNONYMS = {"centre": ("centre", "center", "middle")}


def _pattern(words) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def attributes(caption: str) -> list[tuple[str, re.Pattern]]:
    """The attributes a reference caption names, each with the pattern a completion must match to name it too.
    Multi-word positions are matched before their parts; a digit word also accepts its numeral."""
    found = []
    for c in COLOURS:
        if _pattern([c]).search(caption):
            found.append((c, _pattern([c])))
    for s in SHAPES:
        if _pattern([s]).search(caption):
            found.append((s, _pattern([s])))
    for p in POSITIONS:
        if _pattern(_SYNONYMS.get(p, (p,))).search(caption):
            found.append((p, _pattern(_SYNONYMS.get(p, (p,)))))
    for n, w in enumerate(DIGIT_WORDS):
        if _pattern([w, str(n)]).search(caption):
            found.append((w, _pattern([w, str(n)])))
    return found


def _wrong_names(completion: str, named: set[str]) -> int:
    """How many attributes of the vocabulary the completion names that the reference does not (hedging by
    listing every colour must not pay)."""
    vocab = [*COLOURS, *SHAPES, *POSITIONS, *DIGIT_WORDS]
    return sum(1 for w in vocab if w not in named and _pattern(_SYNONYMS.get(w, (w,))).search(completion))


@register("caption_correctness")
class CaptionCorrectness(Reward):
    """Fraction of the reference caption's attributes (colour, shape, position; or the digit) that the completion
    names, minus `wrong_penalty` per attribute of the vocabulary it names wrongly, clipped to [0, 1]. None where
    the reference names no attribute of the built-in vocabulary (TRL's "does not apply")."""

    name = "caption_correctness"

    def __init__(self, wrong_penalty: float = 0.5):
        super().__init__()
        if wrong_penalty < 0:
            raise ValueError(f"caption_correctness: wrong_penalty must be >= 0, got {wrong_penalty}")
        self.wrong_penalty = float(wrong_penalty)

    def score(self, prompts, completions, **columns):
        refs = columns.get("captions", columns.get("caption"))
        if refs is None or len(refs) != len(completions):
            raise ValueError("caption_correctness needs the reference captions as the 'captions' column, "
                             "one per completion")
        out = []
        for completion, ref in zip(completions, refs):
            attrs = attributes(str(ref))
            if not attrs:
                out.append(None)
                continue
            hit = sum(1 for _, p in attrs if p.search(completion)) / len(attrs)
            wrong = _wrong_names(completion, {a for a, _ in attrs})
            out.append(min(1.0, max(0.0, hit - self.wrong_penalty * wrong)))
        return out
