"""The frozen base sharded over processes with FSDP2 (`torch.distributed.fsdp.fully_shard`): `distributed.strategy: fsdp`.

Layout. Every decoder layer is its own FSDP unit and the root unit holds the rest (embeddings, final norm,
LM head); each process keeps 1/N of every parameter (dim-0 shards) and all-gathers a unit just before it runs.
The base is frozen, so there are no base-weight gradients and no reduce-scatter: backward all-gathers each
layer again only to carry gradients *through* it to the prefix K/V, which enter every layer as the
attention cache. The prefix (its MLP) and the value head are small and stay replicated; their gradients are
all-reduced as under `replicate` (`Dist.sum_grads`), so checkpoints and artifacts are the same files.

Collectives must match. Every process must run the same sequence of forwards (and backwards) of the
sharded model, whatever its data. The places where that could differ are made to agree here:
- a decode loop stops when every process's rows are finished (`agree_all`), not its own;
- prompt sharing in `models.decoder_only.score_completions` (two forwards instead of one) is chosen by all or none;
- a process with no rows in a minibatch / micro-batch / evaluation batch runs one throwaway row whose loss
  weight is zero (`padding_starts`, `local_rows`).
Under `replicate` none of this runs (each helper is the identity), so that path is unchanged.

Decoding. With `fsdp_decode: reshard` (default) each token costs one all-gather per layer (+ the root);
`resident` keeps the gathered layers for the whole decode loop (one all-gather per layer per loop), at
the cost of holding the whole model while sampling (`decoding`). CUDA-graph compilation of the rollout
engine is off for a sharded model (collectives inside captured graphs).

Loading (`load_sharded`). The model is built on the meta device (buffers real: rotary tables etc. are computed
as usual), sharded, materialised shard-sized (`to_empty`), then each process reads only its rows of every
tensor from the safetensors files (`safe_open(...).get_slice`): no process ever holds the whole model.
Checkpoints that cannot be read that way (.bin files, renamed keys) fall back to what accelerate's
`cpu_ram_efficient_loading` does: process 0 loads the full model on its host, and each tensor is broadcast
in turn, every process keeping its shard (peak: the whole model on process 0's host, one tensor elsewhere).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from rlprefix.distributed.collectives import _ATTR, _State, is_sharded
from rlprefix.distributed.groups import Dist

# ---- sharding a model ------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers' `_no_split_modules` classes (LlamaDecoderLayer,
    GPT2Block, ...), else the ModuleList with one entry per hidden layer."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return list(m)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard (no _no_split_modules)")


def shard(model: nn.Module, dist: Dist | None = None, *, decode: str = "reshard") -> nn.Module:
    """Shard a frozen model in place with FSDP2, one unit per decoder layer plus the root; returns it.

    Parameters may be real or on the meta device (then `to_empty` and load, see `load_sharded`). With a single
    process (no process group) there is nothing to shard across and the model is returned as it is."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # FSDP2's public API arrived in torch 2.6
        raise RuntimeError(f"distributed.strategy: fsdp needs torch >= 2.6 (fully_shard); this is {torch.__version__}") from e

    dist = dist or Dist()
    if decode not in ("reshard", "resident"):
        raise ValueError(f"fsdp decode must be 'reshard' or 'resident', got {decode!r}")
    if is_sharded(model):
        return model
    if not dist.enabled:
        return model
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("rlprefix shards the frozen base only: call rlprefix.models.loading.freeze(model) first")
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    # inner units first (model.modules() lists parents before children)
    for layer in reversed(decoder_layers(model)):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # the root too reshards after forward (FSDP's default keeps it gathered between forward and backward,
    # which for a frozen model in no-grad sampling would mean: gathered for good)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    setattr(model, _ATTR, _State(dist, decode))
    return model


# ---- loading ---------------------------------------------------------------------------------------------------
def _safetensors_files(path: str, dist: Dist) -> list[Path] | None:
    """The checkpoint's safetensors files, or None (hub ids: process 0 downloads first, the others then find
    them in the cache)."""
    p = Path(path)
    if not p.is_dir():
        def fetch():
            try:
                from huggingface_hub import snapshot_download

                return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
            except Exception:  # noqa: BLE001 - anything unusual: the broadcast path loads it instead
                return None

        p = fetch() if dist.is_main else None
        dist.barrier()
        p = p if dist.is_main else fetch()
        if p is None:
            return None
    index = p / "model.safetensors.index.json"
    if index.is_file():
        return sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = p / "model.safetensors"
    return [single] if single.is_file() else None


def _persistent_buffers(model) -> list[str]:
    return [f"{mod_name}.{name}" if mod_name else name for mod_name, mod in model.named_modules()
            for name, b in mod.named_buffers(recurse=False)
            if b is not None and name not in mod._non_persistent_buffers_set]


def _names(model) -> dict[int, list[str]]:
    """Every name of each unique parameter (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _candidates(model, name: str) -> list[str]:
    base = getattr(model, "base_model_prefix", "") or ""
    out = [name]
    if base and name.startswith(base + "."):
        out.append(name[len(base) + 1:])
    elif base:
        out.append(f"{base}.{name}")
    return out


def _local_rows(param, dist: Dist) -> tuple[torch.Tensor, int, int]:
    """(this process's local tensor, first row, end row) of a dim-0 sharded parameter (FSDP2 uses torch.chunk)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0, param.shape[0] if param.dim() else 0
    local = param.to_local()
    n = param.shape[0]
    chunk = math.ceil(n / param.device_mesh.size())
    start = min(param.device_mesh.get_local_rank() * chunk, n)
    end = start + local.shape[0]
    if end > n:
        raise RuntimeError(f"unexpected FSDP shard layout ({local.shape} of {tuple(param.shape)})")
    return local, start, end


def _load_slices(model, files: list[Path], dist: Dist) -> bool:
    """Each process reads its rows of every parameter straight from the files; False when a tensor is missing."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    plan = []
    for names in _names(model).values():
        key = next((c for n in names for c in _candidates(model, n) if c in where), None)
        plan.append((names[0], key))
    persistent = [n for n in _persistent_buffers(model) if n in where]
    if not dist.all(all(key is not None for _, key in plan)):
        return False
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, key in plan:
            param = params[name]
            local, start, end = _local_rows(param, dist)
            sl = where[key].get_slice(key)
            if list(sl.get_shape()) != list(param.shape):
                raise ValueError(f"{key}: shape {sl.get_shape()} in the checkpoint, {tuple(param.shape)} in the model")
            if end > start or param.dim() == 0:
                local.copy_(sl[start:end] if param.dim() else sl[:])
        for name in persistent:
            model.get_buffer(name).copy_(where[name].get_tensor(name))
    return True


def _load_broadcast(model, path: str, dtype, dist: Dist) -> None:
    """Process 0 loads the whole model on its host and broadcasts it tensor by tensor; each keeps its rows."""
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict() if dist.is_main else None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in list(params.items()) + [(n, model.get_buffer(n)) for n in _persistent_buffers(model)]:
            buf = (full[name].to(dist.device, t.dtype) if dist.is_main else
                   torch.empty(t.shape, dtype=t.dtype, device=dist.device))
            tdist.broadcast(buf, src=0)
            if name in params:
                local, start, end = _local_rows(t, dist)
                local.copy_(buf[start:end] if t.dim() else buf)
            else:
                t.copy_(buf)
            del buf


def load_sharded(path: str, dtype: torch.dtype, device, dist: Dist, decode: str = "reshard",
                 method: str = "auto"):
    """The frozen model of checkpoint `path` (a resolved dir or hub id) sharded over `dist`'s processes, built
    without any process holding all of it where the checkpoint allows (see the module docstring).
    `method`: auto | slices | broadcast (the latter two for tests)."""
    from accelerate import init_empty_weights  # only a sharded load needs these
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied input/output embeddings: one parameter (not always tied on meta by from_config)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    model.requires_grad_(False).eval()  # frozen, as rlprefix.models.loading.freeze does
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shard(model, dist, decode=decode)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
    files = _safetensors_files(path, dist) if method in ("auto", "slices") else None
    if not (dist.all(files is not None) and _load_slices(model, files, dist)):
        if method == "slices":
            raise ValueError(f"{path}: not every tensor can be read as slices of safetensors files")
        _load_broadcast(model, path, dtype, dist)
    return model.requires_grad_(False).eval()


def count_all_gathers() -> list[int]:
    """Count FSDP2's parameter all-gathers from now on, in the returned one-element list (diagnostics for tests
    and benchmarks: it wraps a private FSDP2 function); [-1] if that function has moved."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module
    except ImportError:
        return [-1]
    count, original = [0], group_module.foreach_all_gather

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    group_module.foreach_all_gather = counted
    return count
