"""Continuous batching without HTTP: rows that join a running batch mid-decode, with mixed prefixes, prompt lengths
and sampling settings, get the tokens `engine.sample` gives each of them alone (greedy and sampled), through slot
reuse, packing and growth of the slot cache."""
from __future__ import annotations

import re

import pytest
import torch

from rlprefix import Prefix, kv_spec
from rlprefix.batcher import Row
from rlprefix.continuous import BankCache, RunningBatch
from rlprefix.engine import sample
from rlprefix.runtime import prefix_kv
from rlprefix.slots import right_aligned
from tiny import tiny_model, tiny_tokenizer


def _alone(model, tok, row: Row) -> list[int]:
    ids = torch.tensor([row.prompt_ids])
    kw = dict(do_sample=False) if row.temperature == 0 else dict(temperature=row.temperature, top_p=row.top_p)
    out = sample(model, tok, ids, torch.ones_like(ids), kv=row.kv, max_new_tokens=row.max_tokens,
                 row_seeds=[row.seed], decode=False, compile=False, **kw)
    return out.completion_ids[0, :int(out.completion_mask.sum())].tolist()


def _rows(model, tok):
    spec = kv_spec(model)
    kvs = {name: prefix_kv(model, Prefix(spec, n, "kv", init_std=1.0, generator=torch.Generator().manual_seed(n)))
           for name, n in (("alpha", 4), ("beta", 7))}
    prompts = ["hello world", "The film was wonderful and", "good", "Write a one-sentence review of a coffee shop.",
               "positive review", "I hated the food", "nice"]
    settings = [(0.0, 1.0), (0.9, 1.0), (1.0, 0.8), (0.0, 1.0), (0.7, 1.0), (1.0, 1.0), (0.9, 1.0)]
    names = ["alpha", "base", "beta", "beta", "alpha", "base", "alpha"]
    rows = []
    for i, (prompt, (temperature, top_p), name) in enumerate(zip(prompts, settings, names)):
        ids = tok(prompt)["input_ids"]
        rows.append(Row(name, kvs.get(name), ids, 20 + 7 * (i % 3), temperature, top_p, 1000 + i))
    return rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_joining_mid_decode_equal_their_single_results(arch):
    """Rows join at different steps of a running batch (three at once, then one by one), run to different lengths
    and leave at different steps (EOS or max_tokens), in a slot cache that starts at 16 columns (so it packs and
    grows) with 4 slots (so later rows wait for a free one): every row's tokens equal its own engine.sample."""
    model, tok = tiny_model(arch, sharpen=3.0), tiny_tokenizer()
    rows = _rows(model, tok)
    running = RunningBatch(model, tok, BankCache(model), max_rows=4, limit=256)
    running.slots = type(running.slots)(model, 4, 256, columns=16)
    schedule = {0: rows[:3], 2: rows[3:4], 5: rows[4:5], 9: rows[5:6], 10: rows[6:7]}
    got, waiting, step, columns = {}, [], 0, {running.slots.columns}
    while len(got) < len(rows):
        waiting += schedule.get(step, [])
        joining, waiting = waiting[:running.free()], waiting[running.free():]
        turn = running.iterate(joining)
        assert not turn.failed
        for row, result in turn.finished:
            got[row.seed] = result.token_ids
        columns.add(running.slots.columns)
        step += 1
    for row in rows:
        assert got[row.seed] == _alone(model, tok, row), (row.prefix, row.temperature)
    assert len(columns) > 1  # the slot cache grew
    joined = re.search(r"^rlprefix_rows_joined_running_total (\S+)", running.metrics.render(), re.M).group(1)
    assert float(joined) == len(rows) - 3  # all but the first three joined a running batch
    assert running.slots.n == 0 and running.slots.w == 0


def test_cancelled_rows_leave_and_too_long_rows_fail():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = _rows(model, tok)[:3]
    running = RunningBatch(model, tok, BankCache(model), max_rows=4, limit=45)
    long = Row("base", None, [5] * 30, 20, 1.0, 1.0, 7)
    turn = running.iterate(rows[:2] + [long])
    assert [r for r, _ in turn.failed] == [long] and len(running.running) == 2
    rows[0].cancelled.set()
    turn = running.iterate([rows[2]])
    assert [r for r, _ in turn.finished] == [rows[0]] and len(turn.finished[0][1].token_ids) == 1
    assert [r.row for r in running.running] == [rows[1], rows[2]]  # the last row moved into the freed slot


def test_right_aligned_moves_valid_columns_in_order():
    valid = torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, True]])
    index = right_aligned(valid, 5)
    assert index[0, 3:].tolist() == [0, 2] and index[1, 4:].tolist() == [3] and index[2, 1:].tolist() == [0, 1, 2, 3]
