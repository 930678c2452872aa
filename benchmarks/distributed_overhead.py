"""Per-step cost of the data-parallel code path on CPU: PPO steps on the real default model run plainly
(1 process, 2 threads) and under `accelerate launch` with 2 processes (1 thread each, gloo), same global
batch. On a 2-core machine this measures the communication and duplication overhead, not a speed-up.

    python benchmarks/distributed_overhead.py [--batch 16 --tokens 32 --steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, md_table, write_result


def worker(args):
    # here, not at the top: the launcher process only starts the workers and reads their results
    import torch

    from rewards import build_reward
    from rlprefix import PPOConfig, Prefix, load_model, ppo
    from rlprefix.distributed.groups import Dist

    torch.set_num_threads(args.threads)
    dist = Dist.from_env()
    model, tok = load_model()
    prefix = Prefix.from_text(model, tok, "Write a warm, friendly and positive reply.", 10, "kv")
    times, last = [], [time.perf_counter()]

    def on_step(step, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    res = ppo(model, tok, prefix, str(ROOT / "examples/data/review_prompts.jsonl"), build_reward("sentiment"),
              PPOConfig(steps=args.steps, batch_size=args.batch, minibatch_size=args.batch // 2, epochs=1,
                        max_new_tokens=args.tokens, min_new_tokens=args.tokens, progress=False),
              on_step=on_step, dist=dist)
    if dist.is_main:
        steady = times[1:]
        print("RESULT " + json.dumps({"processes": dist.world_size, "step_s": sum(steady) / len(steady),
                                      "final_reward": res.history[-1]["reward/mean"]}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    common = ["--worker", f"--batch={args.batch}", f"--tokens={args.tokens}", f"--steps={args.steps}"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    runs = {"plain, 1 process x 2 threads": [sys.executable, __file__] + common + ["--threads=2"],
            "accelerate launch, 2 processes x 1 thread": [
                accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), __file__]
            + common + ["--threads=1"]}
    rows = []
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        rows.append({"run": name, **json.loads(line[7:])})
    for r in rows:
        r["step_time_vs_plain"] = r["step_s"] / rows[0]["step_s"]
    table = md_table(rows, [("run", "run"), ("step_s", "s/step"), ("step_time_vs_plain", "x plain"),
                            ("final_reward", "final batch reward")])
    print(table)
    write_result("distributed_overhead", {"settings": vars(args), "rows": rows, "table_md": table})


if __name__ == "__main__":
    main()
