"""Load test of `rlprefix serve`: requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients.

Each request names one of 4 prefixes at random. Two ways to serve the same requests:
- mixed: one server, all 4 prefixes loaded, requests for any prefix batched together as they arrive;
- one prefix at a time: the same requests, grouped by prefix and served prefix after prefix (what a stack
  that holds one adapter at a time can do), with the same number of concurrent clients inside each group.
Latency is per request, send to full reply; requests/s is requests over the wall time of the whole load.
Bounded: a fixed request count per cell and a time cap; loopback only.

    python benchmarks/serve_load.py                   # real SmolLM2-135M-Instruct on CPU, ~5 min on 2 cores
    python benchmarks/serve_load.py --model DIR       # any other model
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, write_result

import rlprefix

TEXTS = ["Reply with warm enthusiasm.", "Reply as a grumpy critic.", "Reply in a formal tone.", "Reply briefly."]


def make_prefixes(model_name: str, out: Path, length: int) -> list[str]:
    model, tok = rlprefix.load_model(model_name)
    names = []
    for i, text in enumerate(TEXTS):
        name = f"p{i}"
        rlprefix.Prefix.from_text(model, tok, text, length=length, kind="kv").save(out / name)
        names.append(name)
    return names


def start_server(model_name: str, prefixes: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "rlprefix.cli", "serve", "--model", model_name, "--prefixes", str(prefixes),
           "--port", str(port), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def post(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        json.loads(r.read())
    return time.perf_counter() - t0


def run_load(url: str, requests: list[dict], clients: int, cap_s: float) -> tuple[list[float], float]:
    """`clients` threads drain `requests` in order; stops handing out new ones after `cap_s`."""
    start = time.perf_counter()

    def one(body):
        return None if time.perf_counter() - start > cap_s else post(url, body)

    with ThreadPoolExecutor(clients) as pool:
        lat = [x for x in pool.map(one, requests) if x is not None]
    return lat, time.perf_counter() - start


def summary(lat: list[float], wall: float) -> dict:
    s = sorted(lat)
    pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"requests": len(s), "wall_s": round(wall, 2), "requests_per_s": round(len(s) / wall, 3),
            "p50_s": round(pct(0.5), 3), "p95_s": round(pct(0.95), 3)}


def workload(names: list[str], n: int, max_tokens: int, rng: random.Random) -> list[dict]:
    prompts = [json.loads(line)["prompt"] for line in open(ROOT / "examples/data/review_prompts_heldout.jsonl")]
    return [{"model": rng.choice(names), "prompt": rng.choice(prompts), "max_tokens": max_tokens,
             "temperature": 1.0, "seed": rng.randrange(1 << 30)} for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", default="8,32,64", help="requests per cell, one per --clients value")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefix-length", type=int, default=8)
    ap.add_argument("--cap-s", type=float, default=60, help="stop sending new requests in a cell after this")
    ap.add_argument("--out", default="serve_load_cpu")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    counts = [int(c) for c in args.requests.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="serve_load."))
    names = make_prefixes(args.model, tmp / "prefixes", args.prefix_length)
    proc, url = start_server(args.model, tmp / "prefixes", max(clients), tmp / "server.log")
    rows = []
    try:
        post(url, {"model": names[0], "prompt": "warm up", "max_tokens": 2})
        for c, n in zip(clients, counts):
            reqs = workload(names, n, args.max_tokens, random.Random(c))
            lat, wall = run_load(url, reqs, c, args.cap_s)
            rows.append({"clients": c, "mode": "mixed", **summary(lat, wall)})
            print(json.dumps(rows[-1]), flush=True)
            lat, wall = [], 0.0
            for name in names:  # the same requests, one prefix after another
                part_lat, part_wall = run_load(url, [r for r in reqs if r["model"] == name], c, args.cap_s / 4)
                lat, wall = lat + part_lat, wall + part_wall
            rows.append({"clients": c, "mode": "one_prefix_at_a_time", **summary(lat, wall)})
            print(json.dumps(rows[-1]), flush=True)
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    finally:
        proc.kill()
        proc.wait()
    batch_lines = [ln for ln in metrics.splitlines() if ln.startswith("rlprefix_batch_")]
    path = write_result(args.out, {"model": args.model, "device": "cpu", "max_tokens": args.max_tokens,
                                   "prefixes": len(names), "prefix_length": args.prefix_length, "rows": rows,
                                   "server_batch_metrics": batch_lines,
                                   "load_average_after": os.getloadavg(),
                                   "decode": "rlprefix.serve.continuous.RunningBatch: continuous batching, rows of "
                                             "any prefix and sampling setting join the running batch at the "
                                             "next decode step"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
