"""`rlprefix serve`: many prefixes on one frozen model behind an OpenAI-compatible HTTP API.

One process holds one copy of the model; every prefix under `--prefixes DIR` is served under its directory
name (the bare model as `base`), chosen per request by the `model` field. Requests are split into rows (one
per completion) and a background thread decodes whatever rows are waiting together (see `batcher`). Each
row samples from its own seeded stream, so a reply for a given `seed` does not depend on the batch.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, Row, RowResult
from .engine import PrefixBank
from .engine import sample as engine_sample  # the server's one sampler (generation.sample stays the reference)
from .generation import eos_ids
from .modeling import load_model
from .openai_protocol import (APIError, ChatRequest, CompletionRequest, chat_chunk, chat_response,
                              completion_chunk, completion_response, new_id, parse_body, sse, usage, validate)
from .prefix_store import PrefixStore, ServedPrefix
from .serve_metrics import Metrics

log = logging.getLogger("rlprefix.serve")
CHAT_DEFAULT_MAX_TOKENS = 256


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


# ---------------------------------------------------------------- decoding (the one call into the model)

def _pad_left(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class BankCache:
    """`PrefixBank`s for decode batches, one per set of prefixes, kept least-recently-used.

    A batch's bank holds only the prefixes its rows use (so its padded length is theirs, not the longest loaded
    prefix), and the same set of prefixes is not stacked again for the next batch. A prefix is identified by
    name and by its K/V tensor (rows capture it at submit time, so a reload mid-flight gives a new key); each
    entry keeps those tensors alive, so their ids cannot be reused while the entry exists.
    """

    def __init__(self, model, size: int = 16, metrics: Metrics | None = None):
        self.model, self.size, self.metrics = model, size, metrics
        self._banks: OrderedDict[tuple, tuple[PrefixBank, list[torch.Tensor]]] = OrderedDict()

    def lookup(self, rows: list[Row]) -> tuple[PrefixBank | None, torch.Tensor]:
        """(bank or None when every row is `base`, prefix_index LongTensor [rows] with -1 for `base`)."""
        unique = {(r.prefix, id(r.kv)): r.kv for r in rows if r.kv is not None}
        if not unique:
            return None, torch.full((len(rows),), -1, dtype=torch.long)
        key = tuple(sorted(unique))
        if key in self._banks:
            self._banks.move_to_end(key)
        else:
            self._banks[key] = (self._build(key, unique), list(unique.values()))
            if len(self._banks) > self.size:
                self._banks.popitem(last=False)
        slot = {k: i for i, k in enumerate(key)}
        index = [slot[(r.prefix, id(r.kv))] if r.kv is not None else -1 for r in rows]
        return self._banks[key][0], torch.tensor(index, dtype=torch.long)

    def _build(self, key: tuple, unique: dict) -> PrefixBank:
        if self.metrics is not None:
            self.metrics.inc("rlprefix_prefix_banks_built_total")
        return PrefixBank(self.model, [unique[k] for k in key])


def _sampling_key(r: Row) -> tuple:
    """Rows that can share one engine call: greedy rows all together, sampled rows by (temperature, top_p)."""
    return ("greedy",) if r.temperature == 0 else ("sample", r.temperature, r.top_p)


def _decode_group(model, tok, rows: list[Row], bank: PrefixBank | None, index: torch.Tensor) -> list[RowResult]:
    """Rows sharing temperature and top_p (any prefixes) in one `engine.sample` call, one seed per row."""
    first = rows[0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = _pad_left([r.prompt_ids for r in rows], pad)
    greedy = first.temperature == 0
    out = engine_sample(model, tok, ids, mask, bank=bank, prefix_index=index if bank is not None else None,
                        max_new_tokens=max(r.max_tokens for r in rows), temperature=1.0 if greedy else first.temperature,
                        do_sample=not greedy, top_p=first.top_p, row_seeds=[r.seed for r in rows], decode=False)
    stop = set(eos_ids(model, tok))
    results = []
    for j, r in enumerate(rows):  # a row's draws are its own, so cutting at its max_tokens equals running to it
        n = min(int(out.completion_mask[j].sum()), r.max_tokens)
        toks = out.completion_ids[j, :n].tolist()
        results.append(RowResult(toks, tok.decode(toks, skip_special_tokens=True), bool(toks) and toks[-1] in stop))
    return results


def _decode_batch(model, tok, rows: list[Row], banks: BankCache) -> list[RowResult]:
    """Decode a batch of rows with any mix of prefixes: one engine call per sampling setting.

    Rows with different prefixes share every decode step (one `PrefixBank` for the batch, `prefix_index` per
    row); the engine's counter-based per-row randomness keeps each row's output independent of the batch.
    """
    bank, index = banks.lookup(rows)
    results: list[RowResult | None] = [None] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(_sampling_key(r), []).append(i)
    for idx in groups.values():
        for i, res in zip(idx, _decode_group(model, tok, [rows[i] for i in idx], bank, index[idx])):
            results[i] = res
    return results


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
        self.model, self.tok, self.store, self.model_name = model, tok, store, model_name
        self.metrics = Metrics()
        self.banks = BankCache(model, metrics=self.metrics)
        self.batcher = Batcher(lambda rows: _decode_batch(model, tok, rows, self.banks), max_batch, wait_s,
                               self.metrics)
        self.context = context_length(model, tok)
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

    def submit(self, entry: ServedPrefix, prompts: list[list[int]], req, max_tokens: int) -> list:
        futures = []
        for ids in prompts:
            for j in range(req.n):
                seed = req.seed + j if req.seed is not None else secrets.randbits(62)
                row = Row(entry.name, entry.kv, ids, max_tokens, req.temperature, req.top_p, seed)
                futures.append(self.batcher.submit(row))
        self.metrics.inc("rlprefix_prompt_tokens_total", sum(len(p) for p in prompts) * req.n)
        return futures


def finish(res: RowResult, stops: list[str]) -> tuple[str, str]:
    """(text cut at the first stop sequence, finish_reason)."""
    cuts = [res.text.find(s) for s in stops if s in res.text]
    if cuts:
        return res.text[:min(cuts)], "stop"
    return res.text, "stop" if res.hit_eos else "length"


def text_pieces(tok, token_ids: list[int], text: str) -> list[str]:
    """`text` split at token boundaries (never inside a multi-byte character); the pieces join to `text`."""
    pieces, sent = [], 0
    for k in range(1, len(token_ids) + 1):
        partial = tok.decode(token_ids[:k], skip_special_tokens=True)
        if partial.endswith("\ufffd"):
            continue
        end = min(len(partial), len(text))
        if end > sent:
            pieces.append(text[sent:end])
            sent = end
    return pieces + ([text[sent:]] if sent < len(text) else [])


async def wait_rows(request: Request, futures: list, metrics: Metrics) -> list[RowResult]:
    """Wait for the rows; if the client goes away first, cancel them (queued rows never reach the model)."""
    waiter = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.1)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                raise ClientGone()
    except (ClientGone, asyncio.CancelledError):
        for f in futures:
            f.cancel()
        waiter.cancel()
        metrics.inc("rlprefix_rows_cancelled_total", len(futures))
        raise


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
    futures = server.submit(entry, prompts, req, max_tokens)
    endpoint = request.url.path
    if req.stream:
        body = _stream(server, request, req, entry, futures, stops, chat, start)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        results = await wait_rows(request, futures, server.metrics)
    except ClientGone:
        return Response(status_code=499)
    choices = [finish(r, stops) for r in results]
    done = sum(len(r.token_ids) for r in results)
    _record(server, endpoint, entry.name, done, start)
    build = chat_response if chat else completion_response
    return build(new_id("chatcmpl" if chat else "cmpl"), entry.name, choices,
                 usage(sum(len(p) for p in prompts) * req.n, done))


def _record(server: Server, endpoint: str, model: str, tokens: int, start: float) -> None:
    m = server.metrics
    m.inc("rlprefix_requests_total", endpoint=endpoint, status=200)
    m.inc("rlprefix_completion_tokens_total", tokens)
    m.observe("rlprefix_request_latency_seconds", time.perf_counter() - start)


async def _stream(server: Server, request: Request, req, entry: ServedPrefix, futures, stops, chat, start):
    """SSE: each choice's text in token-aligned chunks once its decode batch is done, then [DONE].

    (Chunks arrive per decode batch, not per decode step: token-level streaming needs a per-step hook in
    `engine.sample`, which has none yet.)
    """
    rid = new_id("chatcmpl" if chat else "cmpl")
    try:
        results = await wait_rows(request, futures, server.metrics)
    except ClientGone:
        return
    sent = False
    try:
        for index, res in enumerate(results):
            text, reason = finish(res, stops)
            if chat:
                yield sse(chat_chunk(rid, entry.name, index, {"role": "assistant", "content": ""}, None))
            for piece in text_pieces(server.tok, res.token_ids, text):
                yield sse(chat_chunk(rid, entry.name, index, {"content": piece}, None) if chat
                          else completion_chunk(rid, entry.name, index, piece, None))
            yield sse(chat_chunk(rid, entry.name, index, {}, reason) if chat
                      else completion_chunk(rid, entry.name, index, "", reason))
        yield sse("[DONE]")
        sent = True
    finally:
        if not sent:  # the client left while the reply was being written
            server.metrics.inc("rlprefix_rows_cancelled_total", len(futures))
    _record(server, request.url.path, entry.name, sum(len(r.token_ids) for r in results), start)


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
