"""What stands between the network and the API: the API key, the request body limit, and the label a request is counted
under in /metrics.

- API key (`api_key`, else the environment variable RLPREFIX_API_KEY): every route but /health then needs
  `Authorization: Bearer <key>`, compared in constant time (`hmac.compare_digest`); otherwise a 401 in OpenAI's error
  shape. Binding to an address other than loopback without a key logs a warning (`exposure_warning`).
- Body limit (`max_body_bytes`): a declared Content-Length over it is a 413 before any of the body is read; a body
  sent without one (chunked) is counted as it arrives and refused (413) once over.
- Metrics labels: a request is counted under the route template it matched (`/v1/models/{name}`), or "other" for
  a path no route serves, so clients cannot add label values (nor series) by inventing paths.
"""
from __future__ import annotations

import hmac
import ipaddress
import os

from starlette.responses import JSONResponse
from starlette.routing import Match

from rlprefix.serve.metrics import Metrics
from rlprefix.serve.protocol import APIError
from rlprefix.settings import ServeSettings, default_of

API_KEY_ENV = "RLPREFIX_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers, liveness probes)
MAX_BODY_BYTES = default_of(ServeSettings, "max_body_bytes")  # one definition: rlprefix.settings.ServeSettings
OTHER = "other"


def endpoint_label(routes, scope) -> str:
    """The route template a request matched, "other" for any path no route serves: a fixed set of label values."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", OTHER)
    return OTHER


def error_response(metrics: Metrics, endpoint: str, e: APIError) -> JSONResponse:
    """`e` as OpenAI error JSON, counted in /metrics under `endpoint` (a label from `endpoint_label`)."""
    metrics.inc("rlprefix_requests_total", endpoint=endpoint, status=e.status)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def resolve_api_key(api_key: str | None) -> str | None:
    """The key to require: `api_key`, else $RLPREFIX_API_KEY; None when neither is set (or either is blank)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return (key.strip() or None) if key is not None else None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to log when the server is reachable beyond this machine without a key; None otherwise."""
    if api_key or is_loopback(host):
        return None
    return (f"serving on {host} without an API key: anyone who can reach this address can generate, reload prefixes "
            f"and read metrics; set --api-key or {API_KEY_ENV} (or bind to 127.0.0.1)")


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more; this server accepts at most {limit}", None,
                    "request_too_large")


class Guard:
    """ASGI middleware in front of the app: the API key, then the body limit (see the module docstring). `refuse`
    turns an APIError for a request scope into the response that counts it."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, refuse):
        self.app, self.limit, self.refuse = app, max_body_bytes, refuse
        self.key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorised(scope):
            error = APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'", None,
                             "invalid_api_key")
            return await self.refuse(scope, error)(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:  # refused before a byte of it is read
            return await self.refuse(scope, _too_large(declared, self.limit))(scope, receive, send)
        await self.app(scope, self._limited(receive), send)

    def _authorised(self, scope) -> bool:
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _limited(self, receive):
        """`receive` that counts the body as it arrives; over the limit it raises the 413 (the app's error handler
        answers it)."""
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _too_large(seen, self.limit)
            return message

        return limited


def _content_length(scope) -> int | None:
    value = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
