"""The server exposed: /metrics cannot be injected or grown by clients, the API key guards every route but /health,
request bodies are limited, preparing a request never holds up the event loop, and SIGTERM drains within a deadline.

Most tests run the app in this process (uvicorn on a thread, a tiny random llama); the drain test runs a real server
process and sends it SIGTERM.
"""
from __future__ import annotations

import argparse
import http.client
import math
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from rlprefix import Prefix, kv_spec
from rlprefix.serve import app as serve_app
from rlprefix.serve import guard
from rlprefix.serve.app import DRAIN_TIMEOUT_S, MAX_BODY_BYTES, build_server, create_app, run_server, serve_main
from rlprefix.serve.metrics import MAX_SERIES, Metrics
from tiny import save_tiny, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """An app served by uvicorn on a thread of this process, on 127.0.0.1."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None, auth: str | None = None,
                headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
        """(status, headers with lower-case names, body); `path` is sent as given (percent-encoding included)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            if auth is not None:
                hdrs["Authorization"] = auth
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, prefix directory holding one kv prefix "alpha")."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    root = tmp_path_factory.mktemp("prefixes")
    Prefix(kv_spec(model), 3, "kv", init_std=1.0, generator=torch.Generator().manual_seed(1)).save(root / "alpha")
    return model, tok, root


@contextmanager
def serving(model, tok, root, **app_options):
    live = Live(create_app(build_server(model, tok, "tiny", root), **app_options))
    try:
        yield live
    finally:
        live.close()


COMPLETION = json.dumps({"model": "alpha", "prompt": "hello", "max_tokens": 2}).encode()
CHAT = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


# ---- /metrics ----------------------------------------------------------------------------------------------------
def test_hostile_paths_neither_inject_nor_grow_metrics(tiny):
    """Paths that would close a label and start a sample of their own (a quote, a newline), and many distinct
    unknown paths: /metrics still parses, every request is counted under a route template or "other", and the
    number of series stays fixed."""
    with serving(*tiny) as live:
        hostile = ["/a%22%7Dinjected%201%23", "/x%0Arlprefix_prefixes%20999", "/v1/models/%22%7D%0Ainjected%201",
                   "/%5C%22%5Cn", "/v1/completions%22"]
        for path in hostile:
            assert live.request("GET", path)[0] in (404, 405)
        for i in range(80):
            live.request("GET", f"/missing/{i}")
            live.request("POST", f"/v1/{i}/completions", b"{}")
        assert live.request("GET", "/v1/models/nope")[0] == 404
        assert live.request("POST", "/v1/completions", COMPLETION)[0] == 200
        assert live.request("POST", "/v1/completions", b"{")[0] == 400
        text = live.request("GET", "/metrics")[2].decode()
    families = list(text_string_to_metric_families(text))  # raises on a malformed exposition
    samples = [s for f in families for s in f.samples]
    assert all(s.name.startswith("rlprefix_") for s in samples) and "injected" not in text.replace("\\", "")
    requests = [s for s in samples if s.name == "rlprefix_requests_total"]
    endpoints = {s.labels["endpoint"] for s in requests}
    routes = {"/health", "/metrics", "/v1/models", "/v1/models/{name}", "/v1/prefixes/reload", "/v1/completions",
              "/v1/chat/completions"}
    assert endpoints <= routes | {"other"} and {"other", "/v1/models/{name}", "/v1/completions"} <= endpoints
    assert len(requests) <= 6  # (other, 404/405), (/v1/models/{name}, 404), (/v1/completions, 200/400)
    other = sum(s.value for s in requests if s.labels["endpoint"] == "other")
    assert other == len(hostile) - 1 + 160  # all but the one under /v1/models/{name} (a model name: a 404 there)
    assert [s.value for s in samples if s.name == "rlprefix_prefixes"] == [2.0]  # base and alpha, not 999


def test_label_values_are_escaped_and_series_capped():
    m = Metrics()
    nasty = 'a"b\\c\nd}e 1 #'
    m.inc("rlprefix_requests_total", endpoint=nasty, status=404)
    for i in range(3 * MAX_SERIES):
        m.inc("rlprefix_requests_total", endpoint=f"/p{i}", status=404)
    samples = [s for f in text_string_to_metric_families(m.render()) for s in f.samples
               if s.name == "rlprefix_requests_total"]
    assert nasty in {s.labels["endpoint"] for s in samples}
    assert len(samples) == MAX_SERIES + 1 and sum(s.value for s in samples) == 3 * MAX_SERIES + 1
    assert {"endpoint": "other", "status": "other"} in [s.labels for s in samples]


# ---- the API key -------------------------------------------------------------------------------------------------
def test_api_key_guards_every_route_but_health(tiny):
    with serving(*tiny, api_key=KEY) as live:
        assert live.request("GET", "/health")[0] == 200
        routes = [("GET", "/metrics", None), ("GET", "/v1/models", None), ("GET", "/v1/models/alpha", None),
                  ("POST", "/v1/prefixes/reload", b"{}"), ("POST", "/v1/completions", COMPLETION),
                  ("POST", "/v1/chat/completions", CHAT), ("GET", "/nope", None)]
        for method, path, body in routes:
            for auth in (None, "Bearer wrong", f"Basic {KEY}", "Bearer", f"Bearer {KEY}x", KEY):
                status, headers, reply = live.request(method, path, body, auth)
                assert status == 401 and headers["www-authenticate"] == "Bearer", (path, auth)
                error = json.loads(reply)["error"]
                assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
                assert error["param"] is None and "Authorization: Bearer" in error["message"]
            status = live.request(method, path, body, f"Bearer {KEY}")[0]
            assert status == (404 if path == "/nope" else 200), path
            assert live.request(method, path, body, f"bearer  {KEY} ")[0] == status  # scheme case, spaces
        status, _, reply = live.request("POST", "/v1/prefixes/reload", b"{}", f"Bearer {KEY}")
        assert status == 200 and json.loads(reply)["models"] == ["base", "alpha"]
        with pytest.raises(openai.AuthenticationError):
            live.client("wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            live.client("wrong").completions.create(model="alpha", prompt="hi", max_tokens=2)
        client = live.client(KEY)
        assert [m.id for m in client.models.list().data] == ["base", "alpha"]
        assert client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).choices[0].message.role == "assistant"
        metrics = live.request("GET", "/metrics", auth=f"Bearer {KEY}")[2].decode()
    refused = [s for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == "rlprefix_requests_total" and s.labels["status"] == "401"]
    assert {s.labels["endpoint"] for s in refused} == {"/metrics", "/v1/models", "/v1/models/{name}", "other",
                                                      "/v1/prefixes/reload", "/v1/completions", "/v1/chat/completions"}


def test_api_key_is_compared_in_constant_time_and_read_from_the_environment(monkeypatch):
    calls = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    g = guard.Guard(None, api_key=KEY, max_body_bytes=1, refuse=None)
    assert g._authorised({"headers": [(b"authorization", f"Bearer {KEY}".encode())]})
    assert not g._authorised({"headers": [(b"authorization", b"Bearer nope")]})
    assert calls == [(KEY.encode(), KEY.encode()), (b"nope", KEY.encode())]
    monkeypatch.delenv(guard.API_KEY_ENV, raising=False)
    assert guard.resolve_api_key(None) is None and guard.resolve_api_key("k") == "k"
    monkeypatch.setenv(guard.API_KEY_ENV, " from-env\n")
    assert guard.resolve_api_key(None) == "from-env" and guard.resolve_api_key("given") == "given"
    monkeypatch.setenv(guard.API_KEY_ENV, "")
    assert guard.resolve_api_key(None) is None


def test_binding_beyond_loopback_without_a_key_logs_a_warning(tiny, monkeypatch, caplog):
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.9"):
        assert guard.exposure_warning(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        assert "without an API key" in guard.exposure_warning(host, None)
        assert guard.exposure_warning(host, KEY) is None
    model, tok, root = tiny
    monkeypatch.setattr(serve_app, "load_model", lambda *a, **k: (model, tok))
    monkeypatch.setattr(serve_app.uvicorn.Server, "run", lambda self: None)
    monkeypatch.delenv(guard.API_KEY_ENV, raising=False)
    for host, key, warned in (("0.0.0.0", None, True), ("0.0.0.0", KEY, False), ("127.0.0.1", None, False)):
        caplog.clear()
        assert run_server("tiny", root, host=host, api_key=key) == 0
        lines = [r.getMessage() for r in caplog.records if "without an API key" in r.getMessage()]
        assert len(lines) == warned and all(host in line and "\n" not in line for line in lines)


# ---- the options `rlprefix serve` passes -------------------------------------------------------------------------
def test_serve_main_passes_the_options_and_run_server_checks_them(monkeypatch):
    seen = []
    monkeypatch.setattr(serve_app, "run_server", lambda model, prefixes, **kw: seen.append(kw) or 0)
    base = dict(model="m", prefixes="p", host="h", port=1, max_batch=2, batch_wait_ms=3.0, threads=None,
                dtype="float32", device="cpu")
    for extra, want in (({}, (None, DRAIN_TIMEOUT_S, MAX_BODY_BYTES)),  # a command line without the new options
                        (dict(api_key=None, drain_timeout=None, max_body_bytes=None), (None, DRAIN_TIMEOUT_S,
                                                                                        MAX_BODY_BYTES)),
                        (dict(api_key="k", drain_timeout=0.0, max_body_bytes=5), ("k", 0.0, 5))):
        assert serve_main(argparse.Namespace(**base, **extra)) == 0
        assert (seen[-1]["api_key"], seen[-1]["drain_timeout"], seen[-1]["max_body_bytes"]) == want
    monkeypatch.undo()
    monkeypatch.setattr(serve_app, "load_model", lambda *a, **k: pytest.fail("checked after loading the model"))
    for bad in (dict(max_body_bytes=0), dict(max_queue=0), dict(drain_timeout=-1.0), dict(drain_timeout=math.nan),
                dict(drain_timeout=math.inf)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            run_server(None, None, **bad)


# ---- request limits ------------------------------------------------------------------------------------------------
def test_requests_that_would_queue_too_many_rows_get_429(tiny):
    """--max-queue caps the rows (prompts x n) waiting for a slot: a request that would pass it gets 429 in OpenAI's
    rate-limit shape (the openai client's RateLimitError), and one within it is served."""
    model, tok, root = tiny
    live = Live(create_app(build_server(model, tok, "tiny", root, max_queue=4)))
    try:
        client = live.client()
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="alpha", prompt=["a", "b"], n=3, max_tokens=2)
        assert e.value.body["code"] == "rate_limit_exceeded" and "at most 4 may wait" in e.value.body["message"]
        got = client.completions.create(model="alpha", prompt=["a", "b"], n=2, max_tokens=2)
        assert len(got.choices) == 4
    finally:
        live.close()


def _send_raw(port: int, head: bytes, body_chunks=(), timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for c in body_chunks:
            s.sendall(c)
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 20:
            data = s.recv(65536)
            if not data:
                break
            got += data
        return got


def test_bodies_over_the_limit_are_refused_with_413(tiny):
    with serving(*tiny, max_body_bytes=4096) as live:
        started = time.monotonic()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 52428800\r\n\r\n")
        got = _send_raw(live.port, head)  # 50 MiB declared, none sent: answered without reading it
        assert got.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in got and time.monotonic() - started < 5
        chunk = b"x" * 1000
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        got = _send_raw(live.port, head, [b"3e8\r\n" + chunk + b"\r\n"] * 5 + [b"0\r\n\r\n"])
        assert got.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in got
        with pytest.raises(openai.APIStatusError) as e:
            live.client().completions.create(model="alpha", prompt="hi " * 2000, max_tokens=2)
        assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
        status, _, reply = live.request("POST", "/v1/completions", b"{" + b" " * 4000)  # under the limit: parsed
        assert status == 400 and "JSON" in json.loads(reply)["error"]["message"]
        assert live.request("POST", "/v1/completions", COMPLETION)[0] == 200


def _health_latencies(live: Live, busy: threading.Thread, at_least: int = 8) -> list[float]:
    """/health round trips while `busy` runs (at least `at_least` of them)."""
    out = []
    while busy.is_alive() or len(out) < at_least:
        t = time.perf_counter()
        assert live.request("GET", "/health", timeout=10)[0] == 200
        out.append(time.perf_counter() - t)
        time.sleep(0.01)
    return out


def test_health_answers_while_a_large_prompt_is_refused(tiny):
    """A prompt of ~0.9 MB (within the body limit, far beyond the context) is refused as too long for the context
    without tokenising it on the event loop; /health answers within ~100 ms all the while."""
    with serving(*tiny) as live:
        replies = []
        body = json.dumps({"model": "alpha", "prompt": "good great love " * 56000, "max_tokens": 2}).encode()
        assert len(body) < guard.MAX_BODY_BYTES
        big = threading.Thread(target=lambda: replies.append(live.request("POST", "/v1/completions", body)))
        big.start()
        time.sleep(0.02)
        latencies = _health_latencies(live, big)
        status, _, reply = replies[0]
    assert status == 400 and json.loads(reply)["error"]["code"] == "context_length_exceeded"
    assert sorted(latencies)[-2] < 0.1 and max(latencies) < 0.5, latencies


class _SlowTokenizer:
    """The tiny tokenizer, taking a second to tokenise any text holding "SLOW" (a stand-in for a long prompt or chat
    template on a real tokenizer)."""

    def __init__(self, tok):
        self.__dict__["_tok"] = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def __call__(self, text, **kw):
        if "SLOW" in text:
            time.sleep(1.0)
        return self._tok(text, **kw)


def test_tokenising_runs_off_the_event_loop(tiny):
    model, tok, root = tiny
    with serving(model, _SlowTokenizer(tok), root) as live:
        replies = []
        jobs = [("/v1/completions", {"model": "alpha", "prompt": "SLOW hello", "max_tokens": 2}),
                ("/v1/chat/completions", {"model": "alpha", "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "SLOW hi"}]})]
        for path, job in jobs:
            slow = threading.Thread(target=lambda: replies.append(live.request("POST", path, json.dumps(job).encode())))
            slow.start()
            latencies = _health_latencies(live, slow)
            assert sorted(latencies)[-2] < 0.1 and max(latencies) < 0.5, latencies
    assert [r[0] for r in replies] == [200, 200]


# ---- SIGTERM: drain within the deadline -----------------------------------------------------------------------------
def _stream_lines(port: int, body: dict, lines: list, first: threading.Event) -> None:
    """POST a streamed completion and collect its SSE lines (set `first` at the first data line)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        while line := r.readline():
            if line.startswith(b"data: "):
                lines.append(line.strip())
                first.set()
    except (OSError, http.client.HTTPException) as e:
        lines.append(repr(e).encode())
    finally:
        first.set()
        conn.close()


DRAIN = 4.0


def test_sigterm_drains_in_flight_requests_within_the_deadline(tmp_path):
    """SIGTERM while one streamed request is decoding and a long backlog waits: the stream in flight completes, the
    backlog is cut at the drain deadline, and the process exits soon after (not once the backlog is served)."""
    save_tiny(tmp_path / "model", "llama")
    port, log = free_port(), tmp_path / "server.log"
    script = (f"from rlprefix.serve.app import run_server; run_server({str(tmp_path / 'model')!r}, None, "
              f"port={port}, max_batch=2, batch_wait_ms=0, drain_timeout={DRAIN})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/health")
                break
            except OSError:
                time.sleep(0.2)
        lines, first = [], threading.Event()
        short = threading.Thread(target=_stream_lines, args=(port, {"model": "base", "prompt": "hello", "stream": True,
                                                                    "max_tokens": 8, "seed": 1}, lines, first))
        short.start()
        assert first.wait(30)  # decoding
        backlog = {"model": "base", "prompt": "The film was", "max_tokens": 200, "temperature": 1.0, "n": 32}
        pool = ThreadPoolExecutor(6)  # 192 rows of up to 200 tokens, 2 rows a step: far beyond the deadline
        cut = [pool.submit(_post_status, port, {**backlog, "seed": 100 * i}) for i in range(6)]
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - started
        short.join(timeout=30)
        statuses = [f.result(timeout=30) for f in cut]
        pool.shutdown()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    text = log.read_text()
    assert lines[-1] == b"data: [DONE]", lines[-3:]  # the request in flight finished
    assert any(s != 200 for s in statuses) and "timeout graceful shutdown exceeded" in text, (statuses, text[-2000:])
    assert took < DRAIN + 10, took  # the drain deadline, then shutdown; not the backlog's ~19000 decode steps


def _post_status(port: int, body: dict) -> int | str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException) as e:
        return repr(e)
    finally:
        conn.close()
