"""Training checkpoints without pickle: tensors in safetensors, everything else (optimiser scalars,
RNG states, counters) in JSON. Written atomically as a directory (STATE_TENSORS + STATE_JSON, named in
rlprefix.files)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from rlprefix.files import STATE_JSON, STATE_TENSORS, load_tensors, read_json, recover_artifact_dir, write_artifact_dir


def optimizer_state(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "optim") -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    np_state = np.random.get_state()
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def load_rng_state(tensors: dict, meta: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, g in (generators or {}).items():
        if f"rng.gen.{name}" in tensors:
            g.set_state(tensors[f"rng.gen.{name}"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    return write_artifact_dir(path, {STATE_TENSORS: tensors, STATE_JSON: meta})


def _state_file(path: str | Path) -> Path | None:
    """The one test of whether there is a checkpoint at `path`: its STATE_JSON, once a swap that a crash
    interrupted is repaired (see `recover_artifact_dir`); None when there is none."""
    path = Path(path)
    recover_artifact_dir(path)
    state = path / STATE_JSON
    return state if state.exists() else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of a checkpoint directory, or None when there is none."""
    state = _state_file(path)
    if state is None:
        return None
    return load_tensors(Path(path) / STATE_TENSORS), read_json(state)


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint directory was saved at (0 when it does not say), or None when there is no checkpoint;
    its tensors are not read."""
    state = _state_file(path)
    if state is None:
        return None
    step = read_json(state).get("step", 0)
    return step if isinstance(step, int) else 0


def resume_checkpoint(path: str | Path, config_hash: str, what: str) -> tuple[dict, dict] | None:
    """Load a stage checkpoint if there is one, refusing one written by another config or dataset."""
    ckpt = load_checkpoint(path)
    if ckpt is not None and ckpt[1].get("config_hash") != config_hash:
        raise ValueError(f"{path} was written by a different {what}; use a new output dir or delete the "
                         f"checkpoint to start over")
    return ckpt


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_tensors(module: torch.nn.Module, tensors: dict, prefix: str) -> None:
    sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(sd)
