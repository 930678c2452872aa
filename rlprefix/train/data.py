"""Datasets for the stages: load records (file, datasets.Dataset, list, hub name) and tokenise SFT examples."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rlprefix.decoding.prompts import render_prompts

# The data files rlprefix reads, by suffix, and the `datasets` builder that reads each; any other source is a hub
# dataset or a local dataset directory. Preflight checks a source as a local file by these same suffixes.
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
DATA_SUFFIXES = tuple(DATA_BUILDERS)


def load_records(source, split: str = "train"):
    """A `datasets.Dataset` from a JSONL/JSON/CSV/Parquet file, a Dataset, a list of dicts/strings, or a hub name."""
    import datasets  # here, not at the top: it takes seconds to import, and only stages that read data need it

    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, (list, tuple)):
        rows = [{"prompt": r} if isinstance(r, str) else dict(r) for r in source]
        ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
    else:
        path = Path(str(source))
        if path.suffix in DATA_BUILDERS:
            if not path.exists():
                raise FileNotFoundError(f"dataset file not found: {path}")
            if path.stat().st_size == 0 or not path.read_bytes()[:4096].strip():
                raise ValueError(f"dataset {path} is empty")
            try:
                ds = datasets.load_dataset(DATA_BUILDERS[path.suffix], data_files=str(path), split="train")
            except Exception as e:  # noqa: BLE001 - datasets raises many types for malformed files
                raise ValueError(f"could not read dataset file {path}: {type(e).__name__}: {e}") from None
            if path.suffix == ".txt":
                ds = ds.rename_column("text", "prompt")
        else:
            ds = datasets.load_dataset(str(source), split=split)  # a hub dataset or a local dataset dir
    if len(ds) == 0:
        raise ValueError(f"dataset {source if not isinstance(source, (list, tuple)) else '(list)'} is empty")
    return ds


def require_columns(ds, needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; the dataset has {ds.column_names}")


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: loss on completion tokens only


@dataclass
class Seq2SeqExample(SFTExample):
    """An encoder-decoder example: `source_ids` go to the encoder; `input_ids` are the decoder's inputs (the start
    token + the target) and `labels` = -100 + the target, so logits[t] predicts labels[t + 1] as for SFTExample."""
    source_ids: list[int]


def _split_messages(messages) -> tuple[list[dict], str]:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a 'messages' example must end with an assistant message (its content is the target)")
    return messages[:-1], messages[-1]["content"]


def tokenize_sft(ds, tokenizer, max_length: int = 256, chat: bool | None = None,
                 system: str | None = None, decoder_start: int | None = None) -> list[SFTExample]:
    """Prompt/completion (or chat `messages`) rows -> token ids with completion-only labels.

    The prompt is rendered as at generation time (chat template when present); the completion ends
    with EOS so the prefix learns to stop. Over-long examples lose completion tokens from the end, and
    the count is reported in one warning; an example with no completion token left is an error.
    With `decoder_start` (an encoder-decoder model's decoder start token) the rows become Seq2SeqExamples:
    the prompt is the encoder's source, the completion the decoder's target.
    """
    if "messages" in ds.column_names:
        pairs = []
        for row in ds:
            history, target = _split_messages(row["messages"])
            prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            pairs.append((prompt, target, True))
    else:
        require_columns(ds, ["prompt", "completion"], "warm start")
        rendered = render_prompts(tokenizer, list(ds["prompt"]), chat, system)
        used_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        pairs = [(p, c, used_chat) for p, c in zip(rendered, ds["completion"])]
    examples, truncated = [], 0
    eos = tokenizer.eos_token or ""
    for i, (prompt, completion, templated) in enumerate(pairs):
        p_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
        c_ids = tokenizer(str(completion) + eos, add_special_tokens=False)["input_ids"]
        if len(p_ids) + len(c_ids) > max_length:
            truncated += 1
            c_ids = c_ids[: max(0, max_length - len(p_ids))]
        if not c_ids:
            raise ValueError(f"example {i}: the prompt alone is {len(p_ids)} tokens, so nothing of the completion "
                             f"fits in max_length={max_length}; raise max_length or shorten the prompt")
        if decoder_start is not None:
            examples.append(Seq2SeqExample([decoder_start] + c_ids, [-100] + c_ids, p_ids))
        else:
            examples.append(SFTExample(p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    if truncated:
        warnings.warn(f"{truncated} of {len(examples)} examples were longer than max_length={max_length} and "
                      f"lost completion tokens from the end", stacklevel=2)
    return examples


def _pad_right(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; positions come from the mask, so padding side does not change the logits.
    Seq2SeqExamples also carry `source_ids` / `source_mask` for the encoder."""
    ids, mask = _pad_right([e.input_ids for e in examples], pad_id)
    labels, _ = _pad_right([e.labels for e in examples], -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if examples and isinstance(examples[0], Seq2SeqExample):
        batch["source_ids"], batch["source_mask"] = _pad_right([e.source_ids for e in examples], pad_id)
    return batch
