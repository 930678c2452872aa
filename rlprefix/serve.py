"""`rlprefix serve`: many prefixes on one frozen model behind an OpenAI-compatible HTTP API.

One process holds one copy of the model; every prefix under `--prefixes DIR` is served under its directory
name (the bare model as `base`), chosen per request by the `model` field. Requests are split into rows (one
per completion) and decoded with continuous batching: a background thread (`batcher`) runs one decode loop in
which a waiting row joins the running batch at the next step and a finished row leaves it at once, whatever their
prefixes (`continuous`, on the rollout engine's pieces). Each row samples from its own seeded stream, so a reply
for a given `seed` depends neither on the batch nor on when the request arrived.

Tokens reach the request handlers as they are decoded (every turn of the loop): streamed replies send each new
piece of text at once, stop strings end a row's decoding, and a row whose client left leaves the batch at the
next step.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, Row, RowResult, on_loop
from .continuous import BankCache, RunningBatch
from .modeling import is_encoder_decoder, load_model
from .openai_protocol import (APIError, ChatRequest, CompletionRequest, chat_chunk, chat_response,
                              completion_chunk, completion_response, new_id, parse_body, sse, usage, usage_chunk,
                              validate)
from .prefix_store import PrefixStore, ServedPrefix
from .serve_metrics import Metrics

log = logging.getLogger("rlprefix.serve")
CHAT_DEFAULT_MAX_TOKENS = 256


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


# ---------------------------------------------------------------- server state and request handling

def context_length(model, tok) -> int:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return int(min(getattr(tok, "model_max_length", 2048), 1 << 20))


class Server:
    def __init__(self, model, tok, store: PrefixStore, model_name: str, max_batch: int = 32,
                 wait_s: float = 0.005):
        if is_encoder_decoder(model):  # the running batch's slot cache (continuous, slots) is decoder-only
            raise ValueError(f"rlprefix serve supports decoder-only models; {model_name} is an encoder-decoder model")
        self.model, self.tok, self.store, self.model_name = model, tok, store, model_name
        self.metrics = Metrics()
        self.context = context_length(model, tok)
        self.banks = BankCache(model, metrics=self.metrics)
        self.running = RunningBatch(model, tok, self.banks, max_batch, self.context, self.metrics)
        self.eos = self.running.eos
        self.batcher = Batcher(self.running, wait_s, self.metrics)
        self._last_scan = 0.0

    async def rescan(self) -> dict:
        report = await asyncio.to_thread(self.store.scan)
        self._last_scan = time.monotonic()
        self.metrics.set("rlprefix_prefixes", len(self.store.entries()))
        return report

    async def resolve(self, name: str) -> ServedPrefix:
        entry = self.store.get(name)
        if entry is None and self.store.root is not None and time.monotonic() - self._last_scan > 1.0:
            await self.rescan()  # a directory added since the last scan is picked up on first use
            entry = self.store.get(name)
        if entry is None:
            raise APIError(404, f"model {name!r} does not exist; GET /v1/models lists the served ones", "model",
                           "model_not_found")
        return entry

    def encode_completion(self, prompt) -> list[list[int]]:
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = self.tok(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if min(ids) < 0 or max(ids) >= self.model.config.vocab_size:
                raise APIError(400, f"prompt token ids must lie in [0, {self.model.config.vocab_size})", "prompt")
            out.append(ids)
        return out

    def encode_chat(self, req: ChatRequest) -> list[list[int]]:
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [self.tok(text, add_special_tokens=False)["input_ids"]]

    def check_context(self, entry: ServedPrefix, prompts: list[list[int]], max_tokens: int | None,
                      field: str) -> int:
        """The max_tokens to use; a prompt (plus prefix) or budget that does not fit the context is a 400."""
        longest, ctx = max(len(p) for p in prompts), self.context
        room = ctx - entry.length - longest
        if room <= 0:
            raise APIError(400, f"{field} is {longest} tokens; with {entry.length} prefix tokens it does not fit the "
                           f"model's context of {ctx} tokens", field, "context_length_exceeded")
        if max_tokens is None:
            return min(room, CHAT_DEFAULT_MAX_TOKENS)
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + {longest} {field} tokens + {entry.length} prefix tokens "
                           f"exceed the model's context of {ctx} tokens", "max_tokens", "context_length_exceeded")
        return max_tokens

    def submit(self, entry: ServedPrefix, prompts: list[list[int]], req, max_tokens: int, stops: list[str]) -> Call:
        """Queue one row per prompt and choice; streamed rows and rows with stop strings get their tokens per step."""
        loop, call = asyncio.get_running_loop(), Call(self.metrics)
        for ids in prompts:
            for j in range(req.n):
                seed = req.seed + j if req.seed is not None else secrets.randbits(62)
                sink = RowSink(loop, TextStream(self.tok, stops), self.eos, max_tokens, call.wake)
                row = Row(entry.name, entry.kv, ids, max_tokens, req.temperature, req.top_p, seed,
                          sink=sink if req.stream or stops else None)
                call.add(row, sink)
                self.batcher.submit(row)
        self.metrics.inc("rlprefix_prompt_tokens_total", sum(len(p) for p in prompts) * req.n)
        return call


class TextStream:
    """A completion's text as its tokens arrive: incremental detokenisation and stop strings.

    `add(ids)` returns the text that can be released now. New text is the difference of decoded prefixes, decoded
    over a window that starts a token or so back (so a step costs O(1) whatever the length; merged and multi-byte
    tokens come out right), and is held back while it ends in an incomplete character (U+FFFD) or in what may be the
    start of a stop string. The text ends at the first stop string to be completed, which is never released.
    `close()` releases the rest (the decode of all tokens, cut at a stop string). Adding the tokens one at a time or
    all at once gives the same text.
    """

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""       # decoded so far: complete characters only
        self.sent = 0        # characters of `text` released
        self.stopped = False  # a stop string was completed: `text` ends before it
        self._prefix = self._read = 0  # the decode window: ids[_prefix:_read] was decoded into text already
        self._checked = 0    # text[:_checked] holds no complete stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += ids
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def close(self) -> str:
        if self.stopped:
            return ""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            self.text = full  # whatever the window held back (a trailing incomplete character)
        else:  # the windowed decode disagreed with the full one (not seen with byte-level BPE): keep what was sent
            log.warning("incremental detokenisation differs from the full decode: %r vs %r", self.text, full)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        hits = []
        for s in self.stops:
            at = self.text.find(s, max(0, self._checked - len(s) + 1))
            if at >= 0:
                hits.append((at + len(s), at))
        self._checked = end
        if hits:  # the first stop string to be completed (the longer one on a tie) ends the text
            end, self.stopped = min(hits)[1], True
        elif not final:  # hold back a tail that may grow into a stop string
            for k in range(min(max((len(s) for s in self.stops), default=1) - 1, end - self.sent), 0, -1):
                tail = self.text[end - k:]
                if any(len(s) > k and s.startswith(tail) for s in self.stops):
                    end -= k
                    break
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        if self.stopped:
            self.text = self.text[:end]
        return piece


class RowSink:
    """One row (choice) of a request on the event loop: its tokens in (per step from the decode thread, or all at
    once with the row's result), its text pieces and finish reason out. Wakes the request's handler."""

    def __init__(self, loop, text: TextStream, eos: set[int], max_tokens: int, wake: asyncio.Event):
        self.loop, self.text, self.eos, self.max_tokens, self.wake = loop, text, eos, max_tokens, wake
        self.row: Row | None = None
        self.pieces: list[str] = []   # released text not yet sent
        self.output = ""              # all released text
        self.reason: str | None = None  # finish_reason once the row is complete
        self.error: BaseException | None = None

    @property
    def tokens(self) -> int:
        """Completion tokens counted for usage: up to the end of the text (the stop string's last token)."""
        return len(self.text.ids)

    def push(self, ids: list[int], eos: bool | None = None) -> None:
        if self.reason is not None or self.error is not None or not ids:
            return
        piece = self.text.add(ids)
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
        self.push(res.token_ids[len(self.text.ids):], eos=res.hit_eos)
        if self.reason is None:  # cut short (cancelled) or no new token: end here
            self.reason = "stop" if res.hit_eos else "length"
            self._emit(self.text.close())

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.output += piece
        self.wake.set()

    def take(self) -> list[str]:
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


# ---------------------------------------------------------------- the HTTP app

def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        server.metrics.set("rlprefix_prefixes", len(server.store.entries()))
        yield
        server.batcher.stop()

    app = FastAPI(title="rlprefix", lifespan=lifespan)
    metrics = server.metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        metrics.inc("rlprefix_requests_total", endpoint=request.url.path, status=e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return await api_error(request, APIError(e.status_code, str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("request to %s failed", request.url.path)
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "prefixes": [e.name for e in server.store.entries()]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(server, e) for e in server.store.entries()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        return _model_card(server, await server.resolve(name))

    @app.post("/v1/prefixes/reload")
    async def reload():
        report = await server.rescan()
        return {**report, "models": [e.name for e in server.store.entries()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = validate(CompletionRequest, parse_body(await request.body()))
        entry = await server.resolve(req.model)
        prompts = server.encode_completion(req.prompt)
        return await _generate(server, request, req, entry, prompts, req.max_tokens, "prompt", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = validate(ChatRequest, parse_body(await request.body()))
        entry = await server.resolve(req.model)
        prompts = server.encode_chat(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await _generate(server, request, req, entry, prompts, max_tokens, "messages", chat=True)

    return app


def _model_card(server: Server, e: ServedPrefix) -> dict:
    return {"id": e.name, "object": "model", "created": 0, "owned_by": "rlprefix", "root": server.model_name,
            "kind": e.kind, "prefix_length": e.length}


async def _generate(server: Server, request: Request, req, entry: ServedPrefix, prompts, max_tokens, field, chat):
    start, stops = time.perf_counter(), req.stops()
    max_tokens = server.check_context(entry, prompts, max_tokens, field)
    call = server.submit(entry, prompts, req, max_tokens, stops)
    prompt_tokens = sum(len(p) for p in prompts) * req.n
    if req.stream:
        body = _stream(server, request, req, entry, call, prompt_tokens, chat, start)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        while True:
            call.wake.clear()
            if call.done():
                break
            await call.wait(request)
    except (ClientGone, asyncio.CancelledError) as e:
        call.cancel()
        if isinstance(e, ClientGone):
            return Response(status_code=499)
        raise
    if call.failed() is not None:
        call.cancel(client_left=False)
        raise call.failed()
    tokens = sum(s.tokens for s in call.sinks)
    _record(server, request.url.path, entry.name, tokens, start)
    build = chat_response if chat else completion_response
    return build(new_id("chatcmpl" if chat else "cmpl"), entry.name, [(s.output, s.reason) for s in call.sinks],
                 usage(prompt_tokens, tokens))


def _record(server: Server, endpoint: str, model: str, tokens: int, start: float) -> None:
    m = server.metrics
    m.inc("rlprefix_requests_total", endpoint=endpoint, status=200)
    m.inc("rlprefix_completion_tokens_total", tokens)
    m.observe("rlprefix_request_latency_seconds", time.perf_counter() - start)


async def _stream(server: Server, request: Request, req, entry: ServedPrefix, call: Call, prompt_tokens: int, chat,
                  start):
    """SSE: each choice's new text as its tokens are decoded (OpenAI chunks carrying the choice index), a last
    chunk per choice with its finish_reason, optionally a usage chunk, then [DONE]. If the client goes away, its
    rows are cancelled: queued ones never run, decoding ones stop at the next step."""
    rid, name = new_id("chatcmpl" if chat else "cmpl"), entry.name
    finished = [False] * len(call.sinks)

    def chunk(index: int, text: str | None, reason: str | None = None) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return sse(chat_chunk(rid, name, index, delta, reason))
        return sse(completion_chunk(rid, name, index, text or "", reason))

    try:
        if chat:
            for index in range(len(call.sinks)):
                yield chunk(index, None)
        while True:
            call.wake.clear()  # before looking: whatever arrives while chunks are sent wakes the wait below at once
            for index, sink in enumerate(call.sinks):
                if finished[index]:
                    continue
                for piece in sink.take():
                    yield chunk(index, piece)
                if sink.error is not None:
                    err = f"internal error: {type(sink.error).__name__}: {sink.error}"
                    yield sse(APIError(500, err, type="server_error").body())
                    call.cancel(client_left=False)
                    finished = [True] * len(call.sinks)
                    return
                if sink.reason is not None:
                    yield chunk(index, "", sink.reason)
                    finished[index] = True
            if all(finished):
                break
            await call.wait(request)
        tokens = sum(s.tokens for s in call.sinks)
        if req.include_usage():
            yield sse(usage_chunk(rid, name, chat, usage(prompt_tokens, tokens)))
        yield sse("[DONE]")
        _record(server, request.url.path, name, tokens, start)
    except ClientGone:
        pass
    finally:
        if not all(finished):  # the client left (or the reply failed) before every choice was complete
            call.cancel()


def serve_main(args) -> int:
    """Entry point of `rlprefix serve` (args: model, prefixes, host, port, max_batch, batch_wait_ms, threads, dtype,
    device)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    model_name = args.model or "smollm2-135m-instruct"
    model, tok = load_model(model_name, args.dtype, args.device)
    store = PrefixStore(model, args.prefixes)
    report = store.scan()
    log.info("model %s on %s: serving %s (refused: %s)", model_name, args.device,
             [e.name for e in store.entries()], sorted(report["refused"]) or "none")
    server = Server(model, tok, store, model_name, args.max_batch, args.batch_wait_ms / 1000)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    return 0
