"""Datasets for the stages: load records (file, datasets.Dataset, list, hub name) and tokenise SFT examples."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rlprefix.decoding.prompts import render_prompts

log = logging.getLogger("rlprefix.train.data")

# The data files rlprefix reads, by suffix, and the `datasets` builder that reads each; any other source is a hub
# dataset or a local dataset directory. Preflight checks a source as a local file by these same suffixes.
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
DATA_SUFFIXES = tuple(DATA_BUILDERS)
JSON_SUFFIXES = tuple(s for s, builder in DATA_BUILDERS.items() if builder == "json")
# The type each key a stage reads must hold, and its name in messages (a number completion is read as its text).
KEY_TYPES = {"prompt": ((str,), "a string"), "completion": ((str, int, float), "a string"),
             "text": ((str,), "a string"), "messages": ((list,), "a list of messages")}
_SPACE = re.compile(r"[ \t\n\r]*")


def check_records_file(path, needs: list[list[str]] = ()) -> int:
    """Read a JSON data file record by record as the loader does (JSON Lines, or one JSON array): UTF-8, valid JSON,
    every record an object with one of the key sets `needs` (the one the first record uses, in every record).
    Raises ValueError naming the file, the line and what is wrong; returns the number of records."""
    path = Path(str(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is fine, as for the loader
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 at byte {e.start} (0x{data[e.start]:02x}); save the file "
                         f"as UTF-8") from None
    keys, n = None, 0
    try:
        for n, (line, row) in enumerate(_array_rows(text) if text.lstrip().startswith("[") else _line_rows(text), 1):
            keys = _check_row(row, needs, keys, f"{path} line {line}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not JSON: {e.msg} (column {e.colno})") from None
    if n == 0:
        raise ValueError(f"dataset {path} is empty")
    return n


def _line_rows(text: str):
    """(line number, value) of each non-blank line of JSON Lines."""
    start = 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise json.JSONDecodeError(e.msg, text, start + e.pos) from None
            yield number, value
        start += len(line) + 1


def _array_rows(text: str):
    """(line number, value) of each item of a document that is one JSON array."""
    decoder, i = json.JSONDecoder(), _SPACE.match(text, text.index("[") + 1).end()
    line, seen = 1, 0
    if text.startswith("]", i):  # an empty array
        i += 1
    else:
        while True:
            value, end = decoder.raw_decode(text, i)
            line, seen = line + text.count("\n", seen, i), i
            yield line, value
            i = _SPACE.match(text, end).end()
            if text.startswith("]", i):
                i += 1
                break
            if not text.startswith(",", i):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
            i = _SPACE.match(text, i + 1).end()
    if text[i:].strip():
        raise json.JSONDecodeError("Extra data", text, _SPACE.match(text, i).end())


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def _check_row(row, needs, keys, where: str):
    """One record: an object holding `keys` (None: the first of `needs` it uses), each of its type; returns keys."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a JSON object but {_kind(row)}; each record is an object such as "
                         f'{{"{(needs or [["prompt"]])[0][0]}": ...}}')
    if not needs:
        return None
    keys = keys or next((k for k in needs if any(c in row for c in k)), needs[0])
    also = (" (records need " + ", or ".join(" and ".join(map(repr, k)) for k in needs)
            + ", the same in every record)") if len(needs) > 1 else ""
    for key in keys:
        if key not in row:
            raise ValueError(f"{where}: missing required key {key!r}{also}")
        types, name = KEY_TYPES.get(key, ((object,), "a value"))
        if row[key] is None or isinstance(row[key], bool) or not isinstance(row[key], types):
            raise ValueError(f"{where}: {key!r} is {_kind(row[key])}, not {name}")
    return keys


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
            if path.suffix in JSON_SUFFIXES:
                check_records_file(path)  # which line is wrong, and how: the loader says neither
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


@dataclass
class ConditionedExample(SFTExample):
    """An example for an image prefix: `condition` is its image's feature (the prefix's encoder's), which the
    batch carries as `condition` [rows, feature_dim] for the prefix to bind."""
    condition: list[float]


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
        log.warning("%d of %d examples were longer than max_length=%d and lost completion tokens from the end",
                    truncated, len(examples), max_length)
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
    if examples and isinstance(examples[0], ConditionedExample):
        batch["condition"] = torch.tensor([e.condition for e in examples], dtype=torch.float32)
    return batch
