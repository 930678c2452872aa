"""Shared helpers for benchmarks: result files and the machine description."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# A benchmark measures the tree it sits in: without this, a checkout run with another checkout's editable
# install (e.g. a git worktree sharing one venv) would import that other checkout's rlprefix and rewards.
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))


def package_versions() -> dict:
    """The versions that decide what a result means (transformers' cache API, PEFT's generate, TRL's trainer)."""
    found = {}
    for name in ("transformers", "peft", "trl", "accelerate"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": sys.version.split()[0], "packages": package_versions(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()}


def write_result(name: str, payload: dict) -> Path:
    from rlprefix.files import atomic_write_json  # here: a TRL child process must not load rlprefix (its RSS)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {"machine": machine(), "command": " ".join(sys.argv), **payload})
    return path


def md_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body
