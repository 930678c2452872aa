"""Data parallelism: 2 processes (accelerate launch, CPU/gloo) vs 1 process on a tiny model."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = str(Path(__file__).resolve().parent / "dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, out: Path, processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        cmd = [sys.executable, WORKER, stage, str(out)]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               WORKER, stage, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def result(out: Path, rank: int):
    return load_file(str(out / f"result{rank}" / "prefix.safetensors")), json.loads(
        (out / f"result{rank}" / "info.json").read_text())


@pytest.fixture(scope="module", params=["ppo", "warm_start"])
def runs(request, tmp_path_factory):
    pytest.importorskip("accelerate")
    base = tmp_path_factory.mktemp(request.param)
    launch(request.param, base / "one", 1)
    launch(request.param, base / "two", 2)
    return request.param, base


def test_two_processes_match_one(runs):
    stage, base = runs
    single, info1 = result(base / "one", 0)
    double, info2 = result(base / "two", 0)
    assert info1["world_size"] == 1 and info2["world_size"] == 2
    for k in single:
        assert torch.allclose(single[k], double[k], atol=1e-5, rtol=1e-4), k
    keys = ["reward/mean", "reward/raw_std"] if stage == "ppo" else ["loss"]  # raw_std: over the global batch
    for key in keys:
        assert [h[key] for h in info1["history"]] == pytest.approx([h[key] for h in info2["history"]], abs=1e-5), key


def test_ranks_hold_the_same_prefix_after_every_step(runs):
    stage, base = runs
    r0, i0 = result(base / "two", 0)
    r1, i1 = result(base / "two", 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    if stage == "ppo":
        assert len(i0["hashes"]) == 3 and i0["hashes"] == i1["hashes"]


def test_only_rank_zero_writes_artifacts(runs):
    stage, base = runs
    assert any((base / "two" / "rank0" / "artifacts").iterdir())
    assert not (base / "two" / "rank1" / "artifacts").exists() or not any(
        p.is_file() for p in (base / "two" / "rank1" / "artifacts").rglob("*"))


def test_rlprefix_run_under_accelerate_launch(tmp_path):
    """The same config runs unchanged under `accelerate launch`; only rank 0 writes the artifacts."""
    pytest.importorskip("accelerate")
    from test_config import tiny_run_config

    path = tiny_run_config(tmp_path)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(free_port()), "-m", "rlprefix.cli", "run", str(path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ppo"]["steps"] == 3 and (run / "prefix_compressed" / "manifest.json").exists()
    metrics = (run / "ppo" / "ppo_metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3  # one writer
