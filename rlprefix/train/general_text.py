"""General text against forgetting in the warm start: the built-in sample, mixing it into the training
examples, and the forgetting measure.

A prefix trained on one task steers the frozen model on every input, so it can make the model worse at plain
text (catastrophic forgetting, although no weight of the model changes). Two tools:

- **Mixing** (`warm_start.mix_ratio`, `warm_start.mix_data`). A fraction of the warm start's training examples
  are general-text passages, trained as plain language-model text with the prefix attached: every token of a
  passage after its first is a target (there is no prompt and no chat template), and those tokens enter the
  same per-token mean as the task's completion tokens. `mix_ratio` is a fraction of *examples*,
  r = n_general / (n_task + n_general), so n_general = round(n_task * r / (1 - r)) (at least 1 when r > 0);
  the share of tokens follows from the lengths. The passages are drawn with the seed, each used once before
  any repeats, so the mixed data is a pure function of (data, mix_data, mix_ratio, seed).
- **The measure.** Perplexity of the frozen model on held-out general passages with the prefix
  (`general_ppl`) and without it (`general_ppl_base`), and their ratio `forgetting_ratio` =
  exp(NLL_with - NLL_without) (mean per-token NLL): 1.0 means the prefix leaves general text as likely as
  the bare model does, 1.25 means a quarter higher perplexity. The `warm_start.forgetting_eval` held-out
  passages (chosen with the seed, at most half of the source) are never mixed into training.

`mix_data: builtin` is a sample written for this project (rlprefix/resources/general_text.txt, 288 short
passages, the project's own licence); no download is ever needed.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from rlprefix.train.data import SFTExample, load_records, require_columns
from rlprefix.seeds import derive_seed

BUILTIN = "builtin"

# Perplexities are exp of a mean per-token NLL clipped here, so that a diverged evaluation still gives a finite
# number (exp(50) ~ 5e21) rather than an overflow or an inf in the metrics file.
MAX_NLL = 50.0


def perplexity(nll: float) -> float:
    """exp(`nll`), the mean per-token NLL clipped at MAX_NLL: the one perplexity of the training metrics (the warm
    start's eval_ppl, the forgetting measure). A ratio of perplexities is perplexity(nll_a - nll_b)."""
    return math.exp(min(nll, MAX_NLL))


def builtin_path() -> Path:
    """The shipped general-text sample (one passage per line)."""
    return Path(__file__).resolve().parent.parent / "resources" / "general_text.txt"


def source_path(source: str) -> Path:
    """The file behind `mix_data`: the built-in sample or the given path."""
    return builtin_path() if source == BUILTIN else Path(str(source))


def load_passages(source: str) -> list[str]:
    """Non-empty passages from `builtin`, a .txt file (one passage per line) or a JSONL/JSON/CSV/Parquet file with
    a `text` column."""
    path = source_path(source)
    if not path.is_file():
        raise FileNotFoundError(f"general-text file not found: {path} (use 'builtin' for the sample shipped with "
                                f"rlprefix, a .txt file with one passage per line, or a JSONL file with a 'text' "
                                f"column)")
    if path.suffix == ".txt":
        passages = path.read_text(encoding="utf-8").splitlines()
    else:
        ds = load_records(str(path))
        require_columns(ds, ["text"], "general text (warm_start.mix_data)")
        passages = [str(t) for t in ds["text"]]
    passages = [p.strip() for p in passages if p and p.strip()]
    if len(passages) < 2:
        raise ValueError(f"general text {path} has {len(passages)} passage(s); at least 2 are needed")
    return passages


def text_examples(passages: list[str], tokenizer, max_length: int) -> list[SFTExample]:
    """Passages as plain LM examples: every token a target (the first has no context to be predicted from)."""
    examples = []
    for p in passages:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"][:max_length]
        if len(ids) >= 2:
            examples.append(SFTExample(list(ids), list(ids)))
    return examples


def split_passages(passages: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(pool for mixing, held out for the measure): `n_eval` passages (at most half) chosen with the seed."""
    g = torch.Generator().manual_seed(derive_seed("warm_start/general_split", seed))
    order = torch.randperm(len(passages), generator=g).tolist()
    n_eval = min(int(n_eval), len(passages) // 2)
    return [passages[i] for i in order[n_eval:]], [passages[i] for i in order[:n_eval]]


def mix_count(n_task: int, ratio: float) -> int:
    """General examples to add to `n_task` task examples so they are a fraction `ratio` of all (>= 1 when > 0)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"mix_ratio must be in [0, 1), got {ratio}")
    if ratio == 0 or n_task == 0:
        return 0
    return max(1, round(n_task * ratio / (1 - ratio)))


def mix_in(task: list[SFTExample], pool: list[SFTExample], ratio: float, seed: int) -> list[SFTExample]:
    """`task` followed by mix_count(len(task), ratio) examples of `pool`, drawn in a seeded order and cycled
    only when more are needed than the pool holds. The warm start shuffles every epoch, so the order here
    does not matter."""
    n = mix_count(len(task), ratio)
    if n and not pool:
        raise ValueError("mix_ratio > 0 but no general-text passage is left for mixing (all were held out, or too "
                         "short); add passages or lower warm_start.forgetting_eval")
    picked: list[SFTExample] = []
    rnd = 0
    while len(picked) < n:
        g = torch.Generator().manual_seed(derive_seed("warm_start/general_mix", seed, rnd))
        picked += [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()[:n - len(picked)]]
        rnd += 1
    return list(task) + picked


def forgetting_record(nll_with: float, nll_without: float) -> dict:
    """The forgetting measure from the two mean per-token NLLs on the held-out general text."""
    return {"general_ppl": perplexity(nll_with), "general_ppl_base": perplexity(nll_without),
            "forgetting_ratio": perplexity(nll_with - nll_without)}
