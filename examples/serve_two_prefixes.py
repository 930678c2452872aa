"""Two prefixes, one model, one server: train two small prefixes, serve both, query both with the openai client.

    python examples/serve_two_prefixes.py                 # SmolLM2-135M-Instruct on CPU
    python examples/serve_two_prefixes.py --steps 4       # quicker (about 3 min on 2 busy cores), weaker prefixes

Each prefix gets a short warm start on completions written in its own style (an upbeat one and a terse one),
both are saved under one directory, `rlprefix serve` serves them (and the bare model as `base`), and the same
prompt with the same seed goes to all three.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

import rlprefix

STYLES = {
    "upbeat": ("Reply with warm enthusiasm.", [
        ("Write a one-sentence review of a bakery.", "What a delight: the bread is warm, fragrant and wonderful!"),
        ("Write a one-sentence review of a train.", "A lovely, smooth ride with friendly staff and great views!"),
        ("Write a one-sentence review of a museum.", "Absolutely fascinating, beautifully arranged and such fun!"),
        ("Write a one-sentence review of a hotel.", "A wonderful stay: spotless room, kind staff, perfect bed!"),
    ]),
    "terse": ("Reply in five words.", [
        ("Write a one-sentence review of a bakery.", "Good bread. Fair prices."),
        ("Write a one-sentence review of a train.", "On time. Seats fine."),
        ("Write a one-sentence review of a museum.", "Interesting. Small. Worth visiting."),
        ("Write a one-sentence review of a hotel.", "Clean room. Noisy street."),
    ]),
}


def train(model, tok, text: str, pairs, steps: int, path: Path) -> None:
    work = path.parent.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"{path.name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": " " + c}) + "\n" for p, c in pairs))
    prefix = rlprefix.Prefix.from_text(model, tok, text, length=8, kind="mlp")
    cfg = rlprefix.WarmStartConfig(steps=steps, lr=1e-3, batch_size=4, warmup_steps=2, eval_fraction=0.25,
                                   eval_every=max(steps // 2, 1), progress=False)
    result = rlprefix.warm_start(model, tok, prefix, str(data), cfg, output_dir=work / path.name)
    result.prefix.save(path)


def start_server(model: str, prefixes: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rlprefix.cli", "serve", "--model", model,
                             "--prefixes", str(prefixes), "--port", str(port)], env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited; see its log above")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up in time")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="two_prefixes."))
    model, tok = rlprefix.load_model(args.model)
    for name, (text, pairs) in STYLES.items():
        train(model, tok, text, pairs, args.steps, root / "prefixes" / name)
    proc, url = start_server(args.model, root / "prefixes")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        print("served:", [m.id for m in client.models.list().data])
        question = [{"role": "user", "content": "Write a one-sentence review of a seaside cafe."}]
        for name in ("base", *STYLES):
            reply = client.chat.completions.create(model=name, messages=question, max_tokens=40, seed=0,
                                                   temperature=0.7)
            print(f"[{name}] {reply.choices[0].message.content.strip()}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
