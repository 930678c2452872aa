"""The plumbing both training loops share, so each loop reads as its algorithm: resume from a checkpoint, the
metrics file (JSONL, TensorBoard), the progress bar, periodic checkpoints and the final curves (PNG).

A stage's output directory holds `{name}_metrics.jsonl`, `{name}_curves.png` and its checkpoint directory (named
once, in `StageFiles`); a checkpoint is only resumed by a run whose `config_hash` is the one that wrote it.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from tqdm.auto import tqdm

from rlprefix.train.checkpoint import load_module_tensors, load_optimizer_state, load_rng_state, module_tensors, optimizer_state, resume_checkpoint, rng_state, save_checkpoint
from rlprefix.files import json_hash
from rlprefix.train.metrics import MetricLogger, plot_metrics


@dataclass(frozen=True)
class StageFiles:
    """The names of a training stage's files inside its output directory: `{run}_metrics.jsonl`, `{run}_curves.png`
    and the checkpoint folder, spelled once per stage below. `legacy`: the (run, checkpoint) names earlier releases
    wrote ("warmstart", "ppo_checkpoint"); `migrate` renames them in a run directory written by one, so it resumes."""
    run: str
    checkpoint: str = "checkpoint"
    legacy: tuple[str, str] | None = None

    def migrate(self, stage_dir) -> None:
        """Rename an earlier release's files in `stage_dir` to this release's names (never over existing ones)."""
        if self.legacy is None or stage_dir is None:
            return
        old = StageFiles(*self.legacy)
        for a, b in ((old.checkpoint, self.checkpoint), (old.metrics, self.metrics), (old.curves, self.curves)):
            src, dst = Path(stage_dir) / a, Path(stage_dir) / b
            if a != b and src.exists() and not dst.exists():
                os.replace(src, dst)

    @property
    def metrics(self) -> str:
        return f"{self.run}_metrics.jsonl"

    @property
    def curves(self) -> str:
        return f"{self.run}_curves.png"


WARM_START_FILES = StageFiles(run="warm_start", legacy=("warmstart", "checkpoint"))
PPO_FILES = StageFiles(run="ppo", legacy=("ppo", "ppo_checkpoint"))

# Settings that never change what a stage computes, with the reason; a checkpoint stays valid when they change.
# A stage adds its own (`config_hash(ignore=...)`: NOT_IN_WARM_START_HASH, NOT_IN_PPO_HASH), each with its reason next
# to it. These lists are the one rule of what a checkpoint depends on: rlprefix.freshness reads them too, to name
# what changed before a run starts (and `rlprefix sweep` to decide whether a length's checkpoint is kept).
NOT_IN_HASH = {
    "progress": "only the progress bar",
    "checkpoint_every": "resuming is exact from any checkpoint",
    "log_every": "only which steps reach the metrics file",
}


def config_hash(settings, *, ignore: Iterable[str] = (), blobs: Iterable[bytes] = (), **parts) -> str:
    """What a checkpoint is valid for: a stage's `settings` (a dataclass) without NOT_IN_HASH and `ignore`,
    plus `parts` (JSON-able: the starting prefix's config, the data size) and `blobs` (raw content)."""
    skip = set(NOT_IN_HASH) | set(ignore)
    fields = {k: v for k, v in asdict(settings).items() if k not in skip}
    return json_hash({**fields, **parts}, blobs)


class Extras(Protocol):
    """What a stage's checkpoint holds beyond its modules, optimiser and RNG (e.g. PPO's KL coefficient)."""

    def state(self) -> tuple[dict, dict]:  # (tensors, JSON-able meta)
        ...

    def load_state(self, tensors: dict, meta: dict) -> None:  # may refuse the checkpoint by raising
        ...


class Laps:
    """Seconds per phase of one step: `lap(name)` ends the phase that ran since the previous lap."""

    def __init__(self):
        self.last, self.times = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{name}"], self.last = now - self.last, now


class StageRun:
    """One training stage's run into `out_dir` (None: nothing is written, nothing resumed).

    `resume` starts it, `log` records each step, `maybe_checkpoint` saves, `close` draws the curves.
    `step` counts the steps done; `history` holds one record per step, checkpoint included."""

    def __init__(self, out_dir, files: StageFiles, config_hash: str, dist, *, steps: int, checkpoint_every: int,
                 what: str = "config", desc: str | None = None, progress: bool = True, tensorboard: bool = True,
                 on_step: Callable[[int, dict], None] | None = None):
        self.out = Path(out_dir) if out_dir else None
        self.name, self.config_hash, self.dist, self.what = files.run, config_hash, dist, what
        self.steps, self.checkpoint_every, self.checkpoint = steps, checkpoint_every, files.checkpoint
        self.files = files
        if self.out is not None and dist.is_main:
            files.migrate(self.out)
        self.desc, self.progress, self.tensorboard, self.on_step = desc or files.run, progress, tensorboard, on_step
        self.step, self.history = 0, []
        self.modules, self.optimizer, self.extras = {}, None, None
        self.logger, self.bar, self.started = None, None, time.perf_counter()

    def resume(self, modules: dict, optimizer, extras: Extras | None = None, *, enabled: bool = True) -> None:
        """Start the run; continue from its checkpoint when there is one (and `enabled`). `modules` (name ->
        nn.Module or None), `optimizer` and `extras` are what every checkpoint of this run saves. On resume the
        stage's `extras` load first (they may refuse the checkpoint), then the modules, optimiser and every RNG."""
        self.modules, self.optimizer, self.extras = modules, optimizer, extras
        ckpt = None
        if self.out is not None and enabled:
            ckpt = resume_checkpoint(self.out / self.checkpoint, self.config_hash, self.what)
        if ckpt is not None:
            tensors, meta = ckpt
            if extras is not None:
                extras.load_state(tensors, meta)
            for name, module in modules.items():
                if module is not None:
                    load_module_tensors(module, tensors, name)
            if optimizer is not None:
                load_optimizer_state(optimizer, tensors, meta["optimizer"])
            load_rng_state(tensors, meta["rng"])
            self.step, self.history = meta["step"], meta["history"]
        if self.out is not None:  # records past the checkpoint's step are dropped from the metrics file
            self.logger = MetricLogger(self.out / self.files.metrics, resume_step=self.step,
                                       tensorboard=self.tensorboard, enabled=self.dist.is_main)
        self.bar = tqdm(total=self.steps, initial=self.step, desc=self.desc,
                        disable=not (self.progress and self.dist.is_main))
        self.started = time.perf_counter()

    def log(self, step: int, record: dict, *, show: dict, write: bool = True) -> None:
        """Step `step` is done: its record joins the history and (when `write`) the metrics file, the stage's
        `on_step(step, record)` hook runs, and the bar moves on showing `show`."""
        self.step = step
        self.history.append({"step": step, **record})
        if self.logger is not None and write:
            self.logger.log(step, record)
        if self.on_step is not None:
            self.on_step(step, record)
        self.bar.set_postfix(**show)
        self.bar.update(1)

    def maybe_checkpoint(self, step: int, *, force: bool = False) -> None:
        """Save every `checkpoint_every` steps, after the last step and when `force` (main process only)."""
        if self.out is None or not self.dist.is_main:
            return
        if not (force or step % self.checkpoint_every == 0 or step == self.steps):
            return
        tensors, meta = self.extras.state() if self.extras is not None else ({}, {})
        t_opt, m_opt = optimizer_state(self.optimizer) if self.optimizer is not None else ({}, None)
        t_rng, m_rng = rng_state()
        for name, module in self.modules.items():
            if module is not None:
                tensors = {**module_tensors(module, name), **tensors}
        save_checkpoint(self.out / self.checkpoint, {**tensors, **t_opt, **t_rng}, {
            "step": step, "history": self.history, "optimizer": m_opt, "rng": m_rng, **meta,
            "config_hash": self.config_hash})

    @property
    def seconds(self) -> float:
        """Seconds since this run started (or resumed)."""
        return time.perf_counter() - self.started

    def close(self, plot_keys: list[str], title: str) -> None:
        """Close the bar and the metrics file, and draw `plot_keys` into `{name}_curves.png`."""
        self.bar.close()
        if self.logger is not None:
            self.logger.close()
            plot_metrics(self.out / self.files.metrics, plot_keys, self.out / self.files.curves, title=title)
