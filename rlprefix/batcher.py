"""Dynamic batching: one background thread owns the model and decodes whatever rows are waiting, together.

Requests (whatever their prefix) are split into rows, one per completion; the thread takes the first
waiting row, then gathers more for a short window (up to `max_batch`), and hands them to `decode` in one
call. A row whose client left before its batch started is dropped (its future was cancelled); one whose client
leaves while it is decoded has `cancelled` set, which `decode` checks at every step (see `serve._StepHook`).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger("rlprefix.serve")


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


@dataclass
class RowResult:
    token_ids: list[int]          # sampled tokens (EOS included when it was sampled), at most max_tokens
    text: str
    hit_eos: bool


class Batcher:
    def __init__(self, decode: Callable[[list[Row]], list[RowResult]], max_batch: int = 32,
                 wait_s: float = 0.005, metrics=None):
        self.decode, self.max_batch, self.wait_s, self.metrics = decode, max_batch, wait_s, metrics
        self._queue: queue.Queue[Row | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="rlprefix-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, row: Row) -> Future:
        self._queue.put(row)
        self._gauge()
        return row.future

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set("rlprefix_queue_rows", self._queue.qsize())

    def _collect(self, first: Row) -> list[Row] | None:
        rows, deadline = [first], time.monotonic() + self.wait_s
        while len(rows) < self.max_batch:
            try:
                row = self._queue.get(timeout=max(deadline - time.monotonic(), 0)) \
                    if time.monotonic() < deadline else self._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:
                self._queue.put(None)  # stop after this batch
                break
            rows.append(row)
        return [r for r in rows if r.future.set_running_or_notify_cancel()]  # drop rows whose client left

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            rows = self._collect(first)
            self._gauge()
            if rows:
                self._run(rows)

    def _run(self, rows: list[Row]) -> None:
        if self.metrics is not None:
            self.metrics.observe("rlprefix_batch_rows", len(rows))
            self.metrics.observe("rlprefix_batch_prefixes", len({r.prefix for r in rows}))
        try:
            results = self.decode(rows)
        except Exception as e:  # one bad batch must not stop the server: fail its rows, keep serving
            log.exception("decode batch of %d rows failed", len(rows))
            for r in rows:
                r.future.set_exception(e)
            return
        for r, res in zip(rows, results):
            r.future.set_result(res)
