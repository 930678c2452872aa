"""What a prefix must match in a model, read from its config (never hard-coded): `KVSpec`, its families, dtypes.

Decoder-only causal LMs and encoder-decoder models (T5, BART, ...: their prefix is the decoder's; see
rlprefix/models/encoder_decoder.py). MHA, GQA and MQA alike.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch


class ModelMismatchError(ValueError):
    """A prefix was made for a model of another architecture (or family)."""


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_bf16_is_slow() -> bool:
    """Whether bfloat16 matmuls on this CPU take torch's generic kernel: oneDNN has no bf16 path without AVX512-BF16
    or AMX, and there a bf16 matmul is ~30x slower than float32 (a 2-core AVX2 EPYC: 99 ms vs 3.3 ms, 256x576x576)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return probe is not None and not probe()
    except RuntimeError:  # a build without oneDNN
        return True


def slow_dtype_warning(dtype: torch.dtype, device) -> str | None:
    """One line for the log when bfloat16 on this device would be far slower than float32, else None."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu" or not cpu_bf16_is_slow():
        return None
    return ("bfloat16 on this CPU (no AVX512-BF16 / AMX) runs on torch's generic matmul, about 30x slower than "
            "float32; use float32 here (model.dtype: float32, warm_start.precision: fp32)")


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
    # an encoder-decoder model (T5, BART): the prefix is on the decoder's self-attention (rlprefix.models.encoder_decoder)
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
    """T5, BART and relatives (see rlprefix.models.encoder_decoder) rather than a decoder-only causal LM."""
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


