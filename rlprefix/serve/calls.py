"""A request's rows on the event loop: each row's `RowSink` (its tokens in, text pieces, log-probs and finish reason
out) and the request's `Call` (wait for them, cancel them when the client leaves)."""
from __future__ import annotations

import asyncio

from starlette.requests import Request

from rlprefix.serve.batcher import Row, RowResult, on_loop
from rlprefix.serve.metrics import Metrics
from rlprefix.serve.protocol import TokenLogprob
from rlprefix.serve.text import TextStream


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


class RowSink:
    """One row (choice) of a request on the event loop: its tokens in (per step from the decode thread, or all at
    once with the row's result), its text pieces and finish reason out. Wakes the request's handler.

    With `logprobs`, each token's record (log-prob, best alternatives) comes with it: `logprobs` lists them for every
    token counted in `tokens`, and each released piece carries those of the tokens since the previous piece (a
    token whose text is held back, or never released, goes with the next piece or the last chunk: `rest`)."""

    def __init__(self, loop, text: TextStream, eos: set[int], max_tokens: int, wake: asyncio.Event,
                 logprobs: bool = False):
        self.loop, self.text, self.eos, self.max_tokens, self.wake = loop, text, eos, max_tokens, wake
        self.row: Row | None = None
        self.pieces: list[tuple[str, list[TokenLogprob]]] = []  # released text not yet sent (with its tokens' records)
        self.output = ""              # all released text
        self.reason: str | None = None  # finish_reason once the row is complete
        self.error: BaseException | None = None
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self._unsent = 0              # logprobs[:_unsent] went out with a piece

    @property
    def tokens(self) -> int:
        """Completion tokens counted for usage: up to the end of the text (the stop string's last token)."""
        return len(self.text.ids)

    def push(self, ids: list[int], eos: bool | None = None, records: list | None = None) -> None:
        if self.reason is not None or self.error is not None or not ids:
            return
        piece = self.text.add(ids)
        if self.logprobs is not None and records:
            self.logprobs += [(t, lp, top) for t, (lp, top) in zip(ids, records)]
        hit_eos = ids[-1] in self.eos if eos is None else eos
        if self.text.stopped:
            self.reason = "stop"
            self.row.cancelled.set()  # the rest of the row is not needed: the engine drops it at the next step
        elif hit_eos or len(self.text.ids) >= self.max_tokens:
            self.reason = "stop" if hit_eos else "length"
            piece += self.text.close()
        self._emit(piece)

    def complete(self, future) -> None:
        """The row's result (it left the running batch): the tokens not yet pushed, then the end of the text."""
        if future.cancelled() or self.reason is not None or self.error is not None:
            return
        if future.exception() is not None:
            self.error = future.exception()
            self.wake.set()
            return
        res: RowResult = future.result()
        have = len(self.text.ids)
        self.push(res.token_ids[have:], eos=res.hit_eos, records=res.logprobs[have:] if res.logprobs else None)
        if self.reason is None:  # cut short (cancelled) or no new token: end here
            self.reason = "stop" if res.hit_eos else "length"
            self._emit(self.text.close())

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append((piece, self.rest()))
            self.output += piece
        self.wake.set()

    def rest(self) -> list[TokenLogprob]:
        """The records not yet sent with a piece (all of them go with the pieces and the last chunk)."""
        if self.logprobs is None:
            return []
        out, self._unsent = self.logprobs[self._unsent:], len(self.logprobs)
        return out

    def take(self) -> list[tuple[str, list[TokenLogprob]]]:
        pieces, self.pieces = self.pieces, []
        return pieces


class Call:
    """A request's rows and their sinks on the event loop; `cancel` when the client leaves."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.rows: list[Row] = []
        self.sinks: list[RowSink] = []
        self.wake = asyncio.Event()

    def add(self, row: Row, sink: RowSink) -> None:
        sink.row = row
        self.rows.append(row)
        self.sinks.append(sink)
        row.future.add_done_callback(lambda f: on_loop(sink.loop, sink.complete, f))

    def done(self) -> bool:
        return all(s.reason is not None or s.error is not None for s in self.sinks)

    def failed(self) -> BaseException | None:
        return next((s.error for s in self.sinks if s.error is not None), None)

    async def wait(self, request: Request, timeout: float = 0.1) -> None:
        """Until something arrived since `wake` was last cleared (the caller clears it before it looks at the sinks,
        so nothing delivered while it was busy is missed); ClientGone if the client disconnected meanwhile."""
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None

    def cancel(self, client_left: bool = True) -> None:
        """Queued rows never reach the model, rows being decoded stop at the next step (the client left, or a row
        of the request failed)."""
        left = [r for r, s in zip(self.rows, self.sinks) if s.reason is None and s.error is None]
        for r in self.rows:
            r.future.cancel()
            r.cancelled.set()
        if left and client_left:
            self.metrics.inc("rlprefix_rows_cancelled_total", len(left))
            self.metrics.inc("rlprefix_requests_cancelled_total")
