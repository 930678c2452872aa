"""Data parallelism over torch.distributed (as set up by `accelerate launch` or torchrun).

Each process samples and scores its share of the rollouts; the tiny prefix and value-head gradients are
averaged with all-reduce, and batch statistics (advantage whitening, metrics) are computed over the global
batch. With one process every method is the identity.

How the frozen model is held is the `distributed.strategy` setting (`DistributedConfig`): `replicate`, every
process loads the whole model; `fsdp`, each process holds a shard of it (FSDP2, see `rlprefix.distributed.fsdp`).
"""
from __future__ import annotations

import atexit
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from rlprefix.settings import Settings, one_of, setting

STRATEGIES = ("replicate", "fsdp")


def _destroy_process_group() -> None:
    """At exit: shut the process group down while the interpreter is still whole. A gloo worker thread that
    drops the last reference to a collective's tensor needs the GIL; during interpreter finalisation it cannot
    take it and the process aborts ("terminate called without an active exception") after all its work is
    done -- seen on a loaded machine in about 1 run in 6 under FSDP, whose device mesh keeps the group alive
    past destroy_process_group. The short sleep lets those threads finish releasing their last work items."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
        time.sleep(0.1)


@dataclass
class DistributedConfig(Settings):
    """How the frozen base model is held by the processes of a run (the `distributed` config section)."""

    section = "distributed"
    strategy: str | None = setting(None, "replicate: every process holds the whole frozen model | fsdp: each holds "
                                   "a shard of it (FSDP2 per decoder layer) | null: fsdp when launched with an "
                                   "accelerate FSDP config, else replicate", one_of(*STRATEGIES))
    fsdp_decode: str = setting("reshard", "fsdp, while sampling: reshard (all-gather every layer at every token, "
                               "least memory) | resident (gather each layer once per decode loop and keep it "
                               "until the loop ends: fewer collectives, the whole model in memory while sampling)",
                               one_of("reshard", "resident"))

    def resolved_strategy(self) -> str:
        """The strategy in force: the setting, else what the launcher asked for (accelerate's FSDP config)."""
        if self.strategy is not None:
            return self.strategy
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "replicate"


class Dist:
    def __init__(self):
        self.enabled = tdist.is_available() and tdist.is_initialized()
        self.rank = tdist.get_rank() if self.enabled else 0
        self.world_size = tdist.get_world_size() if self.enabled else 1
        # where the small tensors of collectives live: NCCL reduces device tensors only, gloo host tensors
        nccl = self.enabled and tdist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @classmethod
    def from_env(cls) -> "Dist":
        """Join the process group when launched by accelerate/torchrun (WORLD_SIZE > 1); otherwise single."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and tdist.is_available() and not tdist.is_initialized():
            from accelerate import PartialState  # optional: only multi-process runs need it

            # initialises the process group from the launcher's environment (nccl on GPUs, gloo on CPUs)
            PartialState(cpu=not torch.cuda.is_available())
            atexit.register(_destroy_process_group)
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.enabled:
            out = t.to(self.device)
            tdist.all_reduce(out, op=tdist.ReduceOp.SUM if op is None else op)
            return out.to(t.device)
        return t

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def sum_grads(self, params) -> None:
        """Sum gradients over processes (losses are already normalised by global counts)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tdist.all_reduce(p.grad)

    def sum(self, x: float) -> float:
        if not self.enabled:
            return float(x)
        return self._reduce(torch.tensor([float(x)], dtype=torch.float64)).item()

    def max(self, x: float) -> float:
        if not self.enabled:
            return float(x)
        return self._reduce(torch.tensor([float(x)], dtype=torch.float64), tdist.ReduceOp.MAX).item()

    def all(self, flag: bool) -> bool:
        """True on every process when `flag` is true on every process."""
        return bool(flag) if not self.enabled else self._reduce(torch.tensor([int(bool(flag))]),
                                                                tdist.ReduceOp.MIN).item() == 1

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on at least one."""
        return bool(flag) if not self.enabled else self.max(int(bool(flag))) == 1

    def mean(self, x: float) -> float:
        if not self.enabled:
            return float(x)
        return self._reduce(torch.tensor([float(x)], dtype=torch.float64)).item() / self.world_size

    def gather_floats(self, xs: list[float]) -> list[float]:
        """Every process's list, concatenated in rank order (lists may differ in length)."""
        if not self.enabled:
            return list(xs)
        lengths = [int(n) for n in self.gather_tensor(torch.tensor([len(xs)]))]
        padded = torch.full((max(lengths),), math.nan, dtype=torch.float64)
        padded[:len(xs)] = torch.tensor(xs, dtype=torch.float64)
        return [v for t, n in zip(self.gather_tensor(padded), lengths) for v in t[:n].tolist()]

    def gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """All ranks' copies of an equally shaped tensor (rank order)."""
        if not self.enabled:
            return [t]
        src = t.to(self.device)
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        tdist.all_gather(out, src)
        return [o.to(t.device) for o in out]

    def masked_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """Global mean and (population) variance over masked entries of every rank."""
        s = self._reduce(torch.stack([(x * mask).sum(), mask.sum(), (x * x * mask).sum()]).double().cpu())
        mean = (s[0] / s[1].clamp(min=1)).item()
        var = max((s[2] / s[1].clamp(min=1)).item() - mean * mean, 0.0)
        return mean, var

    def masked_var(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        return self.masked_moments(x, mask)[1]

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mean, var = self.masked_moments(x, mask)
        return (x - mean) / (var + 1e-8) ** 0.5 * mask


def strategy_of(distributed: str | DistributedConfig | None) -> DistributedConfig:
    if distributed is None:
        return DistributedConfig(strategy="replicate")
    if isinstance(distributed, str):
        return DistributedConfig(strategy=distributed)
    return distributed
