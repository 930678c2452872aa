"""Continuous batching's thread: one background thread owns the model and turns the server's decode loop.

Requests (whatever their prefix) are split into rows, one per completion, and queued. While rows are decoding,
every turn of the loop moves waiting rows into the free slots of the running batch, where they join at the next
decode step (`continuous.RunningBatch`); a row leaves the batch at the step it finishes. When nothing is decoding,
the thread waits for a row and gathers more for a short window (`wait_s`, up to the running batch's free slots), so requests that
arrive together are prefilled together. A row whose client left before it joined is dropped (its future was
cancelled); one whose client leaves while it decodes has `cancelled` set and leaves at the next turn.

Each turn's tokens (with their log-probs, for rows that asked) go to the rows that listen (their `sink`: streamed
replies and rows with stop strings) on the sink's event loop, one wake-up per turn; a finished row's future gets its
result.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from rlprefix.settings import ServeSettings, default_of

log = logging.getLogger("rlprefix.serve.batcher")


@dataclass
class Row:
    prefix: str                   # served name ("base" = no prefix)
    kv: torch.Tensor | None       # its K/V, captured at submit time (a reload cannot pull it away mid-flight)
    prompt_ids: list[int]
    max_tokens: int
    temperature: float            # 0 = greedy
    top_p: float
    seed: int                     # this row's own random stream: its output does not depend on the batch
    future: Future = field(default_factory=Future, repr=False)
    sink: Any = field(default=None, repr=False)  # gets the tokens as they are decoded (None: the result only)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)  # stop decoding it
    logprobs: int | None = None   # record each token's log-prob and this many best alternatives (None: do not)
    ignore_eos: bool = False      # decode max_tokens tokens: an EOS is a token like any other


@dataclass
class RowResult:
    token_ids: list[int]          # sampled tokens (EOS included when it was sampled), at most max_tokens
    text: str
    hit_eos: bool
    logprobs: list | None = None  # per token (when the row asked): (log-prob, [(id, log-prob)] best first)


class Batcher:
    """Runs `running` (a `continuous.RunningBatch`: `free()`, `running`, `iterate(rows)`, `abort()`) on its own
    thread, feeding it queued rows."""

    def __init__(self, running, wait_s: float = default_of(ServeSettings, "batch_wait_ms") / 1000, metrics=None):
        self.running, self.wait_s, self.metrics = running, wait_s, metrics
        self._queue: queue.Queue[Row | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rlprefix-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)  # wakes an idle thread
        self._thread.join(timeout=30)

    def submit(self, row: Row) -> Future:
        self._queue.put(row)
        self._gauge()
        return row.future

    def waiting(self) -> int:
        """Rows queued, not yet in the running batch."""
        return self._queue.qsize()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set("rlprefix_queue_rows", self.waiting())

    def _take(self, limit: int, first: Row | None = None, wait_s: float = 0.0) -> list[Row]:
        """Up to `limit` queued rows (waiting up to `wait_s` for more), without those whose client left."""
        rows, deadline = ([first] if first is not None else []), time.monotonic() + wait_s
        while len(rows) < limit:
            try:
                left = deadline - time.monotonic()
                row = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:
                break
            rows.append(row)
        self._gauge()
        return [r for r in rows if r.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        joining: list[Row] = []
        while not self._stopping.is_set():
            if self.running.running:  # decoding: waiting rows join at the next step
                joining = self._take(self.running.free())
            else:  # idle: wait for a row, then gather the rows that arrive with it
                first = self._queue.get()
                if first is None:
                    break
                joining = self._take(self.running.free(), first, self.wait_s)
                if not joining:
                    continue
            if self._stopping.is_set():
                break
            self._turn(joining)
            joining = []
        stopped = RuntimeError("the server is shutting down")
        for r in joining + self.running.abort():
            _fail(r, stopped)

    def _turn(self, joining: list[Row]) -> None:
        try:
            turn = self.running.iterate(joining)
        except Exception as e:  # one bad step must not stop the server: fail its rows, keep serving
            log.exception("decode step failed (%d rows running, %d joining)", len(self.running.running), len(joining))
            for r in self.running.abort() + joining:
                _fail(r, e)
            return
        _post([(r.sink, t, lp) for r, t, lp in turn.tokens if r.sink is not None])
        for r, result in turn.finished:  # after the tokens: each sink sees its last tokens, then the result
            if not r.future.done():
                r.future.set_result(result)
        for r, e in turn.failed:
            _fail(r, e)


def _fail(row: Row, e: BaseException) -> None:
    if not row.future.done():
        row.future.set_exception(e)


def _post(items: list) -> None:
    """Deliver (sink, token, log-prob record or None) on their event loops (one wake-up per loop for all rows of a
    turn)."""
    loops: dict[asyncio.AbstractEventLoop, list] = {}
    for item in items:
        loops.setdefault(item[0].loop, []).append(item)
    for loop, pairs in loops.items():
        on_loop(loop, _deliver, pairs)


def on_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Call `fn(*args)` on `loop` from another thread; nothing when the loop is closed (shutting down)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the server is shutting down
        pass


def _deliver(items: list) -> None:
    for sink, token, lp in items:
        sink.push([token], records=None if lp is None else [lp])
