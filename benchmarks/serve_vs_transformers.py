"""Serving prefixes vs transformers' own server on the bare model, under guidellm's load.

Servers, one after the other on this machine, each under the same guidellm workload:
  transformers     `transformers serve MODEL --continuous-batching` (the peer: the bare model, continuous batching)
  rlprefix base    `rlprefix serve --model MODEL`, requests for "base" (the bare model, no prefix)
  rlprefix 1/4/16  the same server with 1, 4 and 16 distinct kv prefixes loaded; the requests are spread over them
                   round-robin, so a batch holds rows of several prefixes
Workload (guidellm `run`, profile `concurrent`): 1, 8 and 32 clients, each sending one request after another;
synthetic prompts of --prompt-tokens tokens, --output-tokens tokens out (at most: guidellm asks for `ignore_eos`, which
transformers serve refuses, so it is dropped and both stop at EOS; output tokens/s is the throughput compared), sampled
at temperature 1 without top-k,
streamed (TTFT and inter-token latency come from the stream), legacy /v1/completions (no chat template, so both
servers see the same tokens). Each cell stops at --requests requests or --seconds, whichever comes first.

guidellm sends one model name per run, so every server sits behind the same small loopback proxy that sets the
`model` field (round-robin over the prefixes for rlprefix; the model's id for transformers); its cost is paid by
every row alike.

    pip install -e ".[bench]"                         # guidellm and transformers[serving], CPU torch installed first
    python benchmarks/serve_vs_transformers.py        # real SmolLM2-135M-Instruct on CPU, ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from common import ROOT, md_table, write_result

import rlprefix
from rlprefix.models.loading import resolve_model_path

TEXTS = ["Reply with warm enthusiasm.", "Reply as a grumpy critic.", "Reply in a formal tone.", "Reply briefly.",
         "Answer like a pirate.", "Answer as a poet.", "Be very polite.", "Use simple words.", "Sound excited!",
         "Sound bored.", "Write like a lawyer.", "Write like a child.", "Be sarcastic.", "Be encouraging.",
         "Talk like a sports commentator.", "Talk like a scientist."]
# transformers serve refuses `ignore_eos` (422), so the proxy drops it for every server: both get the same bodies and
# stop at EOS as the model samples it; output tokens per request are reported beside the throughput.
DROPPED = ("ignore_eos",)
# Sampling at T=1 with no top-k on both: transformers serve samples only when the generation config says so.
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "generation_config": json.dumps({"do_sample": True, "top_k": 0})}
METRICS = ("requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def tool(name: str) -> str:
    """A console script of this Python's environment (the venv may not be on PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return proc, url


def make_prefixes(model_dir: str, out: Path, count: int, length: int) -> list[str]:
    model, tok = rlprefix.load_model(model_dir)
    for i, text in enumerate(TEXTS[:count]):
        rlprefix.Prefix.from_text(model, tok, text, length=length, kind="kv").save(out / f"p{i}")
    return [f"p{i}" for i in range(count)]


def proxy(upstream: str, names: list[str]) -> tuple[str, callable]:
    """A loopback proxy to `upstream` that sets each POST body's `model` to the next of `names`."""
    app, turn = FastAPI(), itertools.cycle(names)
    client = httpx.AsyncClient(base_url=upstream, timeout=None, limits=httpx.Limits(max_connections=256))

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request):
        body = await request.body()
        if request.method == "POST" and body:
            fields = {k: v for k, v in json.loads(body).items() if k not in DROPPED}
            body = json.dumps({**fields, "model": next(turn)}).encode()
        upstream_req = client.build_request(request.method, "/" + path, content=body,
                                            headers={"content-type": "application/json"})
        reply = await client.send(upstream_req, stream=True)
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, background=BackgroundTask(reply.aclose),
                                 media_type=reply.headers.get("content-type"))

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
    return f"http://127.0.0.1:{port}", stop


def scenario(args, target: str, model_dir: str) -> dict:
    return {"spec": {
        "backend": {"kind": "openai_http", "target": target, "model": model_dir, "request_format": "/v1/completions",
                    "stream": True, "http2": False, "extras": {"body": SAMPLING}},
        "tokenizer": {"kind": "huggingface_auto", "model": model_dir},
        "profile": {"kind": "concurrent"},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}],
        "constraints": [{"kind": "max_requests", "count": args.requests},
                        {"kind": "max_duration", "seconds": args.seconds}]},
        "benchmarks": [{"profile.streams": c} for c in args.clients]}


def run_guidellm(args, target: str, model_dir: str, work: Path, label: str) -> dict:
    spec = scenario(args, target, model_dir)
    (work / f"{label}.scenario.json").write_text(json.dumps(spec, indent=1))
    out = work / f"{label}.guidellm.json"
    cmd = [tool("guidellm"), "run", "--scenario", str(work / f"{label}.scenario.json"),
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"guidellm failed for {label}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--prefixes", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--prefix-length", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="at most this many requests per cell")
    ap.add_argument("--seconds", type=float, default=45, help="at most this long per cell")
    ap.add_argument("--servers", default="transformers,rlprefix", help="which servers to run")
    ap.add_argument("--out", default="serve_vs_transformers_cpu")
    args = ap.parse_args()
    model_dir = resolve_model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="serve_vs_tf."))
    make_prefixes(model_dir, work / "prefixes", max(args.prefixes), args.prefix_length)
    runs = []
    if "transformers" in args.servers:
        cmd = [tool("transformers"), "serve", model_dir, "--continuous-batching",
               "--device", "cpu", "--host", "127.0.0.1", "--log-level", "warning"]
        runs.append(("transformers", 0, cmd, [model_dir]))
    if "rlprefix" in args.servers:
        for k in [0] + args.prefixes:
            folder = work / f"served{k}"
            for i in range(k):
                shutil.copytree(work / "prefixes" / f"p{i}", folder / f"p{i}")
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "rlprefix.cli", "serve", "--model", model_dir, "--prefixes", str(folder),
                   "--host", "127.0.0.1", "--max-batch", str(max(args.clients))]
            runs.append((f"rlprefix-{k}" if k else "rlprefix-base", k, cmd, [f"p{i}" for i in range(k)] or ["base"]))
    rows = []
    for label, k, cmd, names in runs:
        proc, url = start(cmd, work / f"{label}.log")
        target, stop = proxy(url, names)
        try:
            print(f"{label}: guidellm against {url} via {target}", flush=True)
            report = run_guidellm(args, target, model_dir, work, label)
        finally:
            stop()
            proc.terminate()
            proc.wait(timeout=60)
        for row in parse(report):
            rows.append({"server": label, "prefixes": k, **row})
            print(json.dumps(rows[-1]), flush=True)
    write(args, rows, model_dir)


def parse(report: dict) -> list[dict]:
    """One row per concurrency level from guidellm's JSON report."""
    out = []
    for bench in report["benchmarks"]:
        m = bench["metrics"]
        pct = lambda name, q: m[name]["successful"]["percentiles"][q]  # noqa: E731
        out.append({"clients": bench["config"]["strategy"]["streams"],
                    "requests": m["request_totals"]["successful"],
                    "requests_per_s": m["requests_per_second"]["successful"]["mean"],
                    "output_tokens_per_s": m["output_tokens_per_second"]["successful"]["mean"],
                    "output_tokens_per_request": m["output_token_count"]["successful"]["mean"],
                    "ttft_p50_ms": pct("time_to_first_token_ms", "p50"),
                    "ttft_p99_ms": pct("time_to_first_token_ms", "p99"),
                    "itl_p50_ms": pct("inter_token_latency_ms", "p50"),
                    "itl_p99_ms": pct("inter_token_latency_ms", "p99")})
    return out


def write(args, rows: list[dict], model_dir: str) -> None:
    peer = {r["clients"]: r for r in rows if r["server"] == "transformers"}
    for r in rows:
        p = peer.get(r["clients"])
        if p:
            r["throughput_ratio"] = round(r["output_tokens_per_s"] / p["output_tokens_per_s"], 3)
            r["requests_ratio"] = round(r["requests_per_s"] / p["requests_per_s"], 3)
            r["ttft_p50_ratio"] = round(r["ttft_p50_ms"] / p["ttft_p50_ms"], 3)
            r["itl_p50_ratio"] = round(r["itl_p50_ms"] / p["itl_p50_ms"], 3)
    cols = [("server", "server"), ("clients", "clients"), ("requests", "requests"), ("requests_per_s", "req/s"),
            ("output_tokens_per_s", "out tok/s"), ("output_tokens_per_request", "out tok/req"),
            ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("itl_p50_ms", "ITL p50 ms"),
            ("itl_p99_ms", "ITL p99 ms"), ("throughput_ratio", "tok/s vs transformers")]
    table = md_table(sorted(rows, key=lambda r: (r["clients"], r["server"])), cols)
    print(table)
    path = write_result(args.out, {
        "model": args.model, "model_dir": model_dir, "device": "cpu", "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens, "prefix_length": args.prefix_length, "clients": args.clients,
        "requests_per_cell": args.requests, "seconds_per_cell": args.seconds, "rows": rows, "table_md": table,
        "load_average_after": os.getloadavg(),
        "peer": "transformers serve --continuous-batching (bare model)",
        "driver": "guidellm run, profile concurrent, synthetic_text, /v1/completions, streamed, temperature 1"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
