"""A model sharded over processes, as the rest of rlprefix sees it: is it sharded, over which processes, and the
helpers that keep every process's collectives in step (see rlprefix/distributed/fsdp.py for why each exists).
Under `replicate` each helper is the identity, so that path is unchanged.
"""
from __future__ import annotations

import contextlib
import functools

from torch import nn

from rlprefix.distributed.groups import Dist

_ATTR = "_rlprefix_fsdp"


class _State:
    def __init__(self, dist: Dist, decode: str):
        self.dist, self.decode, self.depth = dist, decode, 0


def is_sharded(model) -> bool:
    return getattr(model, _ATTR, None) is not None


def dist_of(model) -> Dist | None:
    """The processes a sharded model is spread over (None when it is not sharded)."""
    state = getattr(model, _ATTR, None)
    return state.dist if state is not None else None


def fsdp_modules(model) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds (its shards under FSDP, everything when replicated)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


# ---- keeping the processes' collectives in step ----------------------------------------------------------------
def agree_all(model, flag: bool) -> bool:
    """`flag` on every process (sharded), else `flag`: e.g. "my rows are finished" -> "everyone's are"."""
    d = dist_of(model)
    return d.all(flag) if d is not None else bool(flag)


def agree_any(model, flag: bool) -> bool:
    d = dist_of(model)
    return d.any(flag) if d is not None else bool(flag)


def agree_mean(model, x: float) -> float:
    """The mean of `x` over processes (sharded): a value that steers control flow, made identical everywhere."""
    d = dist_of(model)
    return d.mean(x) if d is not None else float(x)


def padding_starts(model, dist: Dist | None, n: int, size: int) -> list[int | None]:
    """Starts of the batches of `size` over `n` local items. For a sharded model split over processes, every
    process gets as many batches as the process with the most; the extra ones are None (run a throwaway row)."""
    starts: list[int | None] = list(range(0, n, size))
    if is_sharded(model) and dist is not None and dist.world_size > 1:
        starts += [None] * (int(dist.max(len(starts))) - len(starts))
    return starts


def local_rows(model, batch: dict, dist: Dist) -> dict:
    """This process's rows (rank::world_size) of a supervised batch. For a sharded model a process left with
    none keeps one row with every label ignored: its forward and backward run, and add nothing."""
    local = {k: v[dist.rank::dist.world_size] for k, v in batch.items()}
    if len(local["input_ids"]) or not is_sharded(model):
        return local
    dummy = {k: v[:1].clone() for k, v in batch.items()}
    dummy["labels"].fill_(-100)
    return dummy


# ---- decoding --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def decoding(model):
    """A decode loop's scope. With `fsdp_decode: resident`, units stay gathered after their first forward until
    the loop ends (then every unit is resharded); otherwise nothing changes."""
    state = getattr(model, _ATTR, None)
    if state is None or state.decode != "resident" or state.depth:
        yield
        return
    state.depth += 1
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        state.depth -= 1
        model.set_reshard_after_forward(True)
        for m in fsdp_modules(model):
            m.reshard()


def decode_loop(fn):
    """Decorator for `fn(model, ...)`: run it inside `decoding(model)`."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with decoding(model):
            return fn(model, *args, **kwargs)
    return wrapper


@contextlib.contextmanager
def gathered(model):
    """The root unit's parameters (embeddings, LM head) gathered, for code that calls those submodules directly."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


