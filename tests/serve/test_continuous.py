"""Continuous batching without HTTP: rows that join a running batch mid-decode, with mixed prefixes, prompt lengths
and sampling settings, get the tokens `engine.sample` gives each of them alone (greedy and sampled), through slot
reuse, packing and growth of the slot cache; and the decode thread that feeds the running batch."""
from __future__ import annotations

import re
import threading
import time

import pytest
import torch

from rlprefix import Prefix, kv_spec
from rlprefix.serve.batcher import Batcher, Row, RowResult
from rlprefix.serve.continuous import BankCache, RunningBatch, Turn
from rlprefix.decoding.engine import sample
from rlprefix.models.family import prefix_kv
from rlprefix.serve.slots import right_aligned
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
    index, placed = right_aligned(valid, 5)
    assert index[0, 3:].tolist() == [0, 2] and index[1, 4:].tolist() == [3] and index[2, 1:].tolist() == [0, 1, 2, 3]
    assert placed.sum(1).tolist() == [2, 1, 4] and placed[0, 3:].all() and placed[2, 1:].all() and not placed[2, 0]


class _Gated:
    """A RunningBatch stand-in for the decode thread: a turn starts (`started` counts them) and runs once `gate`
    gives a permit; a row decodes for max_tokens turns; a joining row with prompt [666] makes the turn fail."""

    def __init__(self, max_rows: int):
        self.max_rows, self.running, self.turns, self.gate = max_rows, [], [], threading.Semaphore(0)
        self.started = 0

    def free(self) -> int:
        return self.max_rows - len(self.running)

    def iterate(self, joining):
        self.started += 1
        assert self.gate.acquire(timeout=30)
        if any(r.prompt_ids == [666] for r in joining):
            raise RuntimeError("boom")
        self.running += [[r, 0] for r in joining]
        self.turns.append(([x[0].seed for x in self.running], [r.seed for r in joining]))
        for x in self.running:
            x[1] += 1
        turn = Turn(finished=[(r, RowResult([0] * n, "", False)) for r, n in self.running if n >= r.max_tokens])
        self.running = [x for x in self.running if x[1] < x[0].max_tokens]
        return turn

    def abort(self):
        rows, self.running = [x[0] for x in self.running], []
        return rows


def _until(check) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_decode_thread_lets_rows_join_and_survives_a_failed_step():
    """A row queued while another decodes joins it at the next turn; a failing turn fails the rows it held and
    the thread goes on serving; the thread stops cleanly."""
    running = _Gated(max_rows=4)
    batcher = Batcher(running, wait_s=0.0)
    batcher.start()
    long, short = Row("base", None, [1], 50, 1.0, 1.0, 1), Row("base", None, [1], 2, 1.0, 1.0, 2)
    batcher.submit(long)
    running.gate.release(3)
    _until(lambda: running.started == 4)  # turn 4 has its rows: `short` comes while it runs
    batcher.submit(short)
    running.gate.release(3)
    assert len(short.future.result(timeout=30).token_ids) == 2
    assert running.turns[3:5] == [([1], []), ([1, 2], [2])] and not long.future.done()  # joined at the next turn
    _until(lambda: running.started == 7)
    bad = Row("base", None, [666], 5, 1.0, 1.0, 3)
    batcher.submit(bad)
    running.gate.release(2)
    for row in (long, bad):
        with pytest.raises(RuntimeError, match="boom"):
            row.future.result(timeout=30)
    again = Row("base", None, [1], 1, 1.0, 1.0, 4)
    batcher.submit(again)
    running.gate.release(1)
    assert again.future.result(timeout=30).token_ids == [0]
    batcher.stop()
    assert not batcher._thread.is_alive()


def test_ignore_eos_decodes_max_tokens_through_an_eos():
    """`ignore_eos` (vLLM's extension, sent by guidellm): with every token an EOS, a plain row stops after one token
    (finish "stop"); an ignore_eos row decodes its max_tokens and does not report an EOS."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    running = RunningBatch(model, tok, BankCache(model), max_rows=4, limit=128)
    running.eos = set(range(model.config.vocab_size))
    plain = Row("base", None, tok("hello world")["input_ids"], 9, 1.0, 1.0, 11)
    ignoring = Row("base", None, tok("hello world")["input_ids"], 9, 1.0, 1.0, 12, ignore_eos=True)
    got, joining = {}, [plain, ignoring]
    while len(got) < 2:
        turn = running.iterate(joining)
        joining = []
        got.update({row.seed: result for row, result in turn.finished})
    assert len(got[11].token_ids) == 1 and got[11].hit_eos
    assert len(got[12].token_ids) == 9 and not got[12].hit_eos
