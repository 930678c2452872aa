"""The HTTP routes and error handlers: every error, whatever raised it, leaves as OpenAI error JSON and is counted in
/metrics under the route template (`guard.endpoint_label`)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlprefix.serve.guard import endpoint_label, error_response
from rlprefix.serve.protocol import APIError
from rlprefix.serve.replies import reply
from rlprefix.serve.server import Server
from rlprefix.serve.store import ServedPrefix

log = logging.getLogger("rlprefix.serve.routes")


def add_error_handlers(app: FastAPI, server: Server):
    """OpenAI error JSON for APIError, Starlette's HTTP errors (unknown path, wrong method) and anything else (a 500);
    returns `refuse(scope, error) -> response`, which the middleware in front of the app uses too."""

    def refuse(scope, e: APIError) -> JSONResponse:
        return error_response(server.metrics, endpoint_label(app.routes, scope), e)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return refuse(request.scope, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return refuse(request.scope, APIError(e.status_code, str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("request to %s failed", endpoint_label(app.routes, request.scope))
        return refuse(request.scope, APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    return refuse


def model_card(server: Server, e: ServedPrefix) -> dict:
    return {"id": e.name, "object": "model", "created": 0, "owned_by": "rlprefix", "root": server.model_name,
            "kind": e.kind, "prefix_length": e.length}


def add_routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "prefixes": [e.name for e in server.store.entries()]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(server, e) for e in server.store.entries()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        return model_card(server, await server.resolve(name))

    @app.post("/v1/prefixes/reload")
    async def reload():
        try:
            report = await server.rescan()
        except OSError as e:  # the prefix directory itself is gone: what is loaded stays served
            raise APIError(500, f"reload failed: {e}", type="server_error") from None
        return {**report, "models": [e.name for e in server.store.entries()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await reply(server, request, await server.prepare(await request.body(), chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await reply(server, request, await server.prepare(await request.body(), chat=True))
