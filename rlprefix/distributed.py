"""Data parallelism over torch.distributed (as set up by `accelerate launch` or torchrun).

Each process loads the frozen model once, samples and scores its share of the rollouts; the tiny prefix
and value-head gradients are averaged with all-reduce, and batch statistics (advantage whitening,
metrics) are computed over the global batch. With one process every method is the identity.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


class Dist:
    def __init__(self):
        self.enabled = tdist.is_available() and tdist.is_initialized()
        self.rank = tdist.get_rank() if self.enabled else 0
        self.world_size = tdist.get_world_size() if self.enabled else 1

    @classmethod
    def from_env(cls) -> "Dist":
        """Join the process group when launched by accelerate/torchrun (WORLD_SIZE > 1); otherwise single."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and tdist.is_available() and not tdist.is_initialized():
            from accelerate import PartialState  # optional: only multi-process runs need it

            # initialises the process group from the launcher's environment (nccl on GPUs, gloo on CPUs)
            PartialState(cpu=not torch.cuda.is_available())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t)
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
        t = torch.tensor([float(x)], dtype=torch.float64)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t.item()

    def mean(self, x: float) -> float:
        if not self.enabled:
            return float(x)
        return self._reduce(torch.tensor([float(x)], dtype=torch.float64)).item() / self.world_size

    def gather_floats(self, xs: list[float]) -> list[float]:
        if not self.enabled:
            return list(xs)
        return [v for t in self.gather_tensor(torch.tensor(xs, dtype=torch.float64)) for v in t.tolist()]

    def gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """All ranks' copies of an equally shaped tensor (rank order)."""
        if not self.enabled:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(out, t)
        return out

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
