"""What sharding the frozen base costs: PPO steps with `distributed.strategy` replicate vs fsdp (decode reshard
and resident), 1 and 2 processes, same global batch. Per run: step time and its parts (rollout, reference,
update), FSDP all-gathers per step, and per process the parameter bytes held, the resident memory after
loading and its peak (on CUDA also the peak allocated device memory).

On CPU (gloo) this measures the communication and bookkeeping overhead of FSDP, not a speed-up. With one
process FSDP2 skips the all-gathers (world size 1) but runs its hooks: that row isolates their fixed cost.
The reshard/resident pair shows what the per-layer, per-token all-gathers of the decode loop cost.

    python benchmarks/fsdp_overhead.py                  # the real default model (SmolLM2-135M)
    python benchmarks/fsdp_overhead.py --model tiny     # a tiny random model: a smoke test of the script
    python benchmarks/fsdp_overhead.py --model PATH --batch 16 --tokens 32 --steps 4 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, md_table, write_result

RUNS = [  # (strategy, fsdp_decode, processes)
    ("replicate", "reshard", 1), ("fsdp", "reshard", 1), ("fsdp", "resident", 1),
    ("replicate", "reshard", 2), ("fsdp", "reshard", 2), ("fsdp", "resident", 2),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args):
    import torch
    import torch.distributed as tdist

    from rewards import build_reward
    from rlprefix import PPOConfig, Prefix, ppo
    from rlprefix.distributed.groups import Dist, DistributedConfig
    from rlprefix.models.loading import load_model
    from rlprefix.distributed.fsdp import count_all_gathers
    from rlprefix.distributed.collectives import is_sharded, local_parameter_bytes

    torch.set_num_threads(args.threads)
    if args.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # FSDP with one process still needs a process group (Dist.from_env joins one only for several)
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dist = Dist.from_env()
    device = f"cuda:{dist.rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    model, tok = load_model(args.model, args.dtype, device, dist=dist,
                            distributed=DistributedConfig(strategy=args.strategy, fsdp_decode=args.decode))
    rss_load = _rss_mb()
    gathers = count_all_gathers() if is_sharded(model) else [0]
    prefix = Prefix.from_text(model, tok, "Write a warm, friendly and positive reply.", 10, "kv")
    times, parts, last, gathers_seen = [], [], [time.perf_counter()], [gathers[0]]

    def on_step(step, record):
        now = time.perf_counter()
        times.append(now - last[0])
        parts.append({k: record[f"time/{k}"] for k in ("generate", "reference", "train")})
        parts[-1]["all_gathers"] = gathers[0] - gathers_seen[0]
        gathers_seen[0] = gathers[0]
        last[0] = now

    res = ppo(model, tok, prefix, str(ROOT / "examples/data/review_prompts.jsonl"), build_reward("sentiment"),
              PPOConfig(steps=args.steps, batch_size=args.batch, minibatch_size=args.batch // 2, epochs=1,
                        max_new_tokens=args.tokens, min_new_tokens=args.tokens, progress=False),
              on_step=on_step, dist=dist)
    steady, steady_parts = times[1:] or times, parts[1:] or parts
    per_rank = {"local_param_mb": local_parameter_bytes(model) / 2**20, "rss_after_load_mb": rss_load,
                "peak_rss_mb": _peak_rss_mb()}
    if device.startswith("cuda"):
        per_rank["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    gathered = {k: dist.gather_floats([v]) for k, v in per_rank.items()}
    if dist.is_main:
        row = {"processes": dist.world_size, "strategy": args.strategy,
               "decode": args.decode if args.strategy == "fsdp" else "-",
               "step_s": sum(steady) / len(steady),
               **{f"{k}_s": sum(p[k] for p in steady_parts) / len(steady_parts) for k in ("generate", "reference",
                                                                                         "train")},
               "all_gathers_per_step": sum(p["all_gathers"] for p in steady_parts) / len(steady_parts),
               **{k: max(v) for k, v in gathered.items()}, "per_rank": gathered,
               "final_reward": res.history[-1]["reward/mean"]}
        print("RESULT " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, dir, hub id, or 'tiny' (random, tests/tiny.py)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="threads in all (split over the processes of a run)")
    ap.add_argument("--only", default=None, help="comma-separated run indices into RUNS (default: all)")
    ap.add_argument("--out", default=None, help="result name (default fsdp_overhead, or fsdp_overhead_tiny)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--strategy", default="replicate")
    ap.add_argument("--decode", default="reshard")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    tmp = None
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny

        tmp = tempfile.TemporaryDirectory()
        model = save_tiny(Path(tmp.name) / "tiny", "llama")
    rows = []
    chosen = [RUNS[int(i)] for i in args.only.split(",")] if args.only else RUNS
    for strategy, decode, processes in chosen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(port), __file__, "--worker", f"--model={model}", f"--dtype={args.dtype}", f"--batch={args.batch}",
               f"--tokens={args.tokens}", f"--steps={args.steps}", f"--threads={max(1, args.threads // processes)}",
               f"--strategy={strategy}", f"--decode={decode}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes)),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        name = f"{strategy}{'/' + decode if strategy == 'fsdp' else ''}, {processes} process{'es' * (processes > 1)}"
        print(f"$ {name}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        rows.append({"run": name, **json.loads(line[7:])})
    base = {r["processes"]: r for r in rows if r["strategy"] == "replicate"}
    for r in rows:
        ref = base.get(r["processes"])
        r["step_vs_replicate"] = r["step_s"] / ref["step_s"] if ref else None
    table = md_table(rows, [("run", "run"), ("step_s", "s/step"), ("step_vs_replicate", "x replicate"),
                            ("generate_s", "rollout s"), ("reference_s", "reference s"), ("train_s", "update s"),
                            ("all_gathers_per_step", "all-gathers/step"), ("local_param_mb", "params MB/process"),
                            ("rss_after_load_mb", "RSS after load MB"), ("peak_rss_mb", "peak RSS MB")])
    print(table)
    name = args.out or ("fsdp_overhead_tiny" if args.model == "tiny" else "fsdp_overhead")
    print(write_result(name, {"settings": {k: v for k, v in vars(args).items()
                                           if k not in ("worker", "strategy", "decode")},
                              "rows": rows, "table_md": table}))


if __name__ == "__main__":
    main()
