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

The package, by concept: this module assembles the app and runs it (startup, shutdown with a drain deadline);
`server` holds the state and prepares requests off the event loop; `routes` and `replies` are the HTTP side;
`guard` the API key, body limit and metric labels; `calls` and `text` a request's rows on the event loop;
`batcher`, `continuous` and `slots` the decode thread; `store` the prefixes; `image_input` a request's image for an
image prefix; `protocol` the OpenAI wire format.
"""
from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from rlprefix.models.loading import load_model
from rlprefix.serve.guard import MAX_BODY_BYTES, Guard, exposure_warning, resolve_api_key
from rlprefix.serve.routes import add_error_handlers, add_routes
from rlprefix.serve.server import Server
from rlprefix.serve.store import PrefixStore
from rlprefix.serve.text import TextStream
from rlprefix.models.loading import DEFAULT_MODEL
from rlprefix.settings import ServeSettings, default_of

__all__ = ["DRAIN_TIMEOUT_S", "MAX_BODY_BYTES", "Server", "TextStream", "build_server", "create_app", "run_server",
           "serve_main"]

log = logging.getLogger("rlprefix.serve.app")
DRAIN_TIMEOUT_S = default_of(ServeSettings, "drain_timeout")  # on SIGTERM/SIGINT: in-flight requests' deadline
MAX_BATCH = default_of(ServeSettings, "max_batch")
WAIT_S = default_of(ServeSettings, "batch_wait_ms") / 1000
MAX_QUEUE = default_of(ServeSettings, "max_queue")


def create_app(server: Server, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The HTTP app for `server`: its routes behind the API key (when one is given) and the body limit."""
    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        server.stop()

    app = FastAPI(title="rlprefix", lifespan=lifespan)
    refuse = add_error_handlers(app, server)
    add_routes(app, server)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, refuse=refuse)
    return app


def build_server(model, tok, model_name: str, prefixes: str | Path | None, max_batch: int = MAX_BATCH,
                 wait_s: float = WAIT_S, max_queue: int = MAX_QUEUE) -> Server:
    """A server for `model` with the prefixes under `prefixes` loaded (a directory that fails is refused with one
    log line; the others load)."""
    store = PrefixStore(model, prefixes)
    report = store.scan()
    log.info("model %s: serving %s (refused: %s)", model_name, [e.name for e in store.entries()],
             sorted(report["refused"]) or "none")
    return Server(model, tok, store, model_name, max_batch, wait_s, max_queue)


def run_server(model: str | None, prefixes: str | Path | None, *, host: str = "127.0.0.1", port: int = 8000,
               max_batch: int = MAX_BATCH, batch_wait_ms: float = WAIT_S * 1000, threads: int | None = None, dtype: str = "float32",
               device: str = "cpu", api_key: str | None = None, drain_timeout: float | None = DRAIN_TIMEOUT_S,
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE) -> int:
    """Load the model, serve it until SIGTERM/SIGINT, then drain: stop accepting connections, give in-flight requests
    up to `drain_timeout` seconds (None: no limit), cut the rest, stop the decode thread. `api_key` (else
    $RLPREFIX_API_KEY) is required on every route but /health; request bodies over `max_body_bytes` get a 413."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if drain_timeout is not None and not (drain_timeout >= 0 and math.isfinite(drain_timeout)):
        raise ValueError(f"drain_timeout must be a finite number of seconds >= 0, got {drain_timeout}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = resolve_api_key(api_key)
    warning = exposure_warning(host, key)
    if warning:
        log.warning(warning)
    if threads:
        torch.set_num_threads(threads)
    model_name = model or DEFAULT_MODEL
    lm, tok = load_model(model_name, dtype, device)
    server = build_server(lm, tok, model_name, prefixes, max_batch, batch_wait_ms / 1000, max_queue)
    log.info("on %s; API key %s; bodies up to %d bytes; on SIGTERM in-flight requests get %s", device,
             "required" if key else "not required", max_body_bytes,
             f"{drain_timeout:g} s" if drain_timeout is not None else "all the time they need")
    config = uvicorn.Config(create_app(server, api_key=key, max_body_bytes=max_body_bytes), host=host, port=port,
                            log_level="info", timeout_graceful_shutdown=drain_timeout)
    uvicorn.Server(config).run()
    return 0


def serve_main(args) -> int:
    """Entry point of `rlprefix serve` (args: model, prefixes, host, port, max_batch, batch_wait_ms, threads, dtype,
    device; and, when the command line has them, api_key, drain_timeout, max_body_bytes: absent or None means the
    default: $RLPREFIX_API_KEY, DRAIN_TIMEOUT_S, MAX_BODY_BYTES)."""
    def option(name: str, default):
        value = getattr(args, name, None)
        return default if value is None else value

    return run_server(args.model, args.prefixes, host=args.host, port=args.port, max_batch=args.max_batch,
                      batch_wait_ms=args.batch_wait_ms, threads=getattr(args, "threads", None), dtype=args.dtype,
                      device=args.device, api_key=getattr(args, "api_key", None),
                      drain_timeout=option("drain_timeout", DRAIN_TIMEOUT_S),
                      max_body_bytes=option("max_body_bytes", MAX_BODY_BYTES),
                      max_queue=option("max_queue", MAX_QUEUE))
