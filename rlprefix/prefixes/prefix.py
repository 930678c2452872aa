"""The prefix: learned per-layer key/value vectors prepended to every attention layer of a frozen model.

Four parameterisations, one module each (kv.py, mlp.py, shared.py, prompt.py), share one interface, `key_values(model) -> [layers, 2, length, kv_dim]`:
- "mlp":    P = base + MLP(P_theta), the Prefix-Tuning training recipe (Li & Liang 2021);
- "kv":     plain per-layer K/V tensors, what `merge()` produces for inference and RL;
- "shared": P^(l) = base^(l) + P_shared W^(l), one matrix for all layers and a linear map per layer, ~70% fewer
            trainable parameters than "kv" (rlprefix/prefixes/shared.py);
- "prompt": input-embedding virtual tokens (Prompt Tuning), the baseline; its K/V are what the
            frozen model computes for those embeddings, so it plugs into the same cache machinery.
A fifth kind, "dynamic", depends on the input (a bank of K/V prefixes mixed per row by a router): it is its own
class, `rlprefix.prefixes.dynamic.DynamicPrefix`, which `for_model` / `from_text` build for kind "dynamic"; a sixth,
"image", depends on an image (`rlprefix.prefixes.image.ImagePrefix`: an image feature mapped to the prefix).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rlprefix.prefixes.artifacts import load_prefix, register_kind, save_prefix
from rlprefix.models.adapter import text_kv
from rlprefix.models.spec import KVSpec, kv_spec
from rlprefix.prefixes.dynamic import DynamicPrefix
from rlprefix.prefixes.image import ImagePrefix
from rlprefix.prefixes import kv, mlp, prompt, shared

PrefixKind = Literal["kv", "mlp", "prompt", "shared", "dynamic", "image"]
KIND_MODULES = {"kv": kv, "mlp": mlp, "prompt": prompt, "shared": shared}  # each kind's fields and K/V
KINDS = tuple(KIND_MODULES)


class Prefix(nn.Module):
    """A trainable prefix for one model architecture (`spec`), `length` virtual tokens long. For an encoder-decoder
    model the layers are its decoder's, in PEFT's slot order (see rlprefix/models/encoder_decoder.py)."""

    def __init__(self, spec: KVSpec, length: int, kind: PrefixKind = "mlp", *, mlp_hidden: int = 512,
                 mlp_input_dim: int | None = None, init_kv: torch.Tensor | None = None,
                 init_std: float = 0.02, generator: torch.Generator | None = None,
                 init_ids: list[int] | None = None, shared_dim: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown prefix kind {kind!r}; use one of {KINDS}")
        if length < 0:
            raise ValueError(f"prefix length must be >= 0, got {length}")
        self.spec, self.length, self.kind = spec, int(length), kind
        # token ids whose K/V initialised this prefix ("from real words"); kept so compression can factorise
        # only the learned change, since the frozen model recomputes these K/V exactly
        self.init_ids = [int(i) for i in init_ids] if init_ids else None
        self.mlp_hidden = int(mlp_hidden)
        self.mlp_input_dim = int(mlp_input_dim or spec.kv_dim)
        shape = (spec.num_layers, 2, self.length, spec.kv_dim)
        if init_kv is not None and tuple(init_kv.shape) != shape:
            raise ValueError(f"init_kv has shape {tuple(init_kv.shape)}, this prefix needs {shape}")

        def randn(*size):
            return torch.randn(*size, generator=generator) * init_std

        if kind == "kv":
            kv.build(self, shape, init_kv, randn)
        elif kind == "mlp":
            mlp.build(self, shape, init_kv, generator)
        elif kind == "shared":
            shared.build(self, init_kv, init_std, generator, shared_dim)
        else:
            prompt.build(self, randn)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, length: int, kind: PrefixKind = "mlp", **kw) -> "Prefix":
        """A randomly initialised prefix whose shapes come from `model.config` (kind "dynamic": a DynamicPrefix,
        `bank_size` entries)."""
        if kind == "dynamic":
            return DynamicPrefix(kv_spec(model), length, **kw)
        if kind == "image":  # needs feature_dim= (the image encoder's feature size)
            return ImagePrefix(kv_spec(model), length, **kw)
        return cls(kv_spec(model), length, kind, **kw)

    @classmethod
    @torch.no_grad()
    def from_text(cls, model, tokenizer, text: str, length: int | None = None, kind: PrefixKind = "mlp",
                  **kw) -> "Prefix":
        """Initialise from real words: the frozen model's own K/V for `text` (tiled to `length` tokens).

        With kind "kv" the prefix then acts exactly as if the text preceded every input; this is
        the initialisation Li & Liang recommend, and the one Cartridges uses. On an encoder-decoder model the K/V
        are the decoder's for `text` with a neutral source (the encoder on EOS alone), in PEFT's slot order; see
        rlprefix/models/encoder_decoder.py for what that means with an even number of decoder layers.
        """
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("prefix init text is empty after tokenisation")
        length = len(ids) if length is None else int(length)
        while len(ids) < length:
            ids = ids + tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids[:length]], device=model.device)
        spec = kv_spec(model)
        if kind == "image":  # the text's K/V (form kv) or embeddings (form embedding) (rlprefix.prefixes.image)
            return ImagePrefix.from_ids(model, ids[0].tolist(), **kw)
        if kind == "dynamic":  # every bank entry starts at the text's K/V (see rlprefix.prefixes.dynamic)
            return DynamicPrefix(spec, length, init_kv=text_kv(model, ids[0].tolist()), init_ids=ids[0].tolist(), **kw)
        if kind == "prompt":
            prefix = cls(spec, length, "prompt", **kw)
            prompt.init_from_ids(prefix, model, ids)
            return prefix
        return cls(spec, length, kind, init_kv=text_kv(model, ids[0].tolist()), init_ids=ids[0].tolist(), **kw)

    # --- the one interface every stage uses ---------------------------------------------------------
    def key_values(self, model=None) -> torch.Tensor:
        """The prefix as [layers, 2, length, kv_dim] K/V (keys as they enter the cache: no RoPE is applied)."""
        return KIND_MODULES[self.kind].key_values(self, model)

    @torch.no_grad()
    def merge(self, model=None) -> "Prefix":
        """Evaluate the reparameterisation once; return a plain "kv" prefix with identical outputs."""
        kv = self.key_values(model).detach().float().cpu()
        return Prefix(self.spec, self.length, "kv", init_kv=kv, mlp_hidden=self.mlp_hidden,
                      mlp_input_dim=self.mlp_input_dim, init_ids=self.init_ids).to(self.device)

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, length={self.length}, spec=({self.spec.describe()})"

    # --- persistence (safetensors + JSON manifest; see rlprefix.prefixes.artifacts) -----------------------------
    def config_dict(self) -> dict:
        cfg = {"kind": self.kind, "length": self.length, "mlp_hidden": self.mlp_hidden,
               "mlp_input_dim": self.mlp_input_dim, "init_ids": self.init_ids}
        if self.kind == "shared":  # only here, so the other kinds' checkpoint hashes stay as they were
            cfg["shared_dim"] = self.shared_dim
        return cfg

    def save(self, path, metadata: dict | None = None, *, overwrite: bool = False) -> None:
        """Write the prefix to directory `path`; only a previous rlprefix artifact there is replaced, unless
        `overwrite`. Record the base model as `metadata["model"]` so tools can find it."""
        save_prefix(self, path, metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path, model=None) -> "Prefix":
        return load_prefix(path, model)


def _from_manifest(spec: KVSpec, kind: str, cfg: dict) -> Prefix:
    cfg = dict(cfg)
    return Prefix(spec, cfg.pop("length"), kind, **cfg)


register_kind(KINDS, _from_manifest)
