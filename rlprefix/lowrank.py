"""Low-rank compression: factorise a prefix's K/V into U·V^T blocks by truncated SVD.

Scopes (which matrices are factorised):
- "matrix": each layer's K and each layer's V separately ([P, kv_dim] each). Rank <= P, so the ratio
            is about P / r: short prefixes cannot shrink much this way.
- "shared": one basis per K and per V shared by all layers: the [L*P, kv_dim] stack of every layer's
            keys (values) ~ A·B, B a common [r, kv_dim] basis. Rank up to kv_dim: the best ratios.
- "whole":  the PEFT layout [P, L*2*kv_dim] as one matrix.
U carries the singular values (U·diag(S)), V is orthonormal.

Anchoring: a prefix initialised from real words starts at the frozen model's own K/V for those tokens, and
training moves it only a little (on the sentiment demo the change is ~8% of the norm). Those K/V cost nothing
to store -- the model recomputes them exactly from ~10 token ids -- so an anchored compression keeps the ids
and factorises only the learned change. Factors can be stored in float16/bfloat16 to halve the bytes.

Choosing a rank by its effect on the model (a KL budget) and measuring what a compression keeps is the
compression stage, `rlprefix.stages.compress`.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from . import sharding
from .artifacts import register_kind, save_prefix
from .modeling import KVSpec, resolve_dtype
from .prefix import Prefix
from .runtime import text_kv

Scope = Literal["matrix", "shared", "whole"]
SCOPES = ("matrix", "shared", "whole")


def to_blocks(kv: torch.Tensor, scope: Scope) -> list[torch.Tensor]:
    """[L, 2, P, D] -> the list of matrices that `scope` factorises."""
    L, _, P, D = kv.shape
    if scope == "matrix":
        return [kv[layer, i] for layer in range(L) for i in (0, 1)]
    if scope == "shared":
        return [kv[:, i].reshape(L * P, D) for i in (0, 1)]
    if scope == "whole":
        return [kv.permute(2, 0, 1, 3).reshape(P, L * 2 * D)]
    raise ValueError(f"unknown compression scope {scope!r}; use one of {SCOPES}")


def from_blocks(blocks: list[torch.Tensor], scope: Scope, spec: KVSpec, length: int) -> torch.Tensor:
    """Inverse of `to_blocks`."""
    L, D, P = spec.num_layers, spec.kv_dim, length
    if scope == "matrix":
        return torch.stack([torch.stack([blocks[2 * layer], blocks[2 * layer + 1]]) for layer in range(L)])
    if scope == "shared":
        return torch.stack([b.view(L, P, D) for b in blocks], dim=1)
    return blocks[0].view(P, L, 2, D).permute(1, 2, 0, 3)


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None, allow_zero: bool = False) -> int:
    """Fixed `rank` (capped at full), or the smallest rank keeping `energy` of sum(s^2); full when neither.

    Rank 0 (drop the factors entirely) is only meaningful for an anchored compression."""
    full = int(s.numel())
    if rank is not None:
        if rank < (0 if allow_zero else 1):
            raise ValueError(f"rank must be >= {0 if allow_zero else 1}, got {rank}")
        return min(int(rank), full)
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        cum = (s ** 2).cumsum(0) / (s ** 2).sum().clamp(min=1e-30)
        return min(int((cum < energy - 1e-7).sum().item()) + 1, full)
    return full


class CompressedPrefix(nn.Module):
    """A prefix stored as low-rank factors; `key_values()` reconstructs [L, 2, P, kv_dim] on the fly."""

    kind = "lowrank"

    def __init__(self, spec: KVSpec, length: int, scope: Scope, shapes: list[tuple[int, int, int]],
                 anchor_ids: list[int] | None = None, dtype: str = "float32"):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"unknown compression scope {scope!r}; use one of {SCOPES}")
        self.spec, self.length, self.scope = spec, int(length), scope
        self.shapes = [tuple(int(x) for x in s) for s in shapes]  # (rows, rank, cols) per block
        self.anchor_ids = [int(i) for i in anchor_ids] if anchor_ids else None
        if self.anchor_ids is not None and len(self.anchor_ids) != self.length:
            raise ValueError(f"anchor has {len(self.anchor_ids)} token ids for a prefix of length {self.length}")
        self.dtype_name = str(dtype).replace("torch.", "")
        dt = resolve_dtype(self.dtype_name)
        self.u = nn.ParameterList([nn.Parameter(torch.zeros(m, r, dtype=dt), requires_grad=False)
                                   for m, r, _ in self.shapes])
        self.v = nn.ParameterList([nn.Parameter(torch.zeros(r, n, dtype=dt), requires_grad=False)
                                   for _, r, n in self.shapes])
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # rebuilt from the model, never saved

    @property
    def ranks(self) -> list[int]:
        return [r for _, r, _ in self.shapes]

    @classmethod
    @torch.no_grad()
    def from_prefix(cls, prefix, model=None, rank: int | None = None, energy: float | None = None,
                    scope: Scope = "shared", anchor: bool | str = "auto", dtype: str = "float32") -> "CompressedPrefix":
        if getattr(prefix, "input_conditioned", False):
            raise ValueError("compression factorises one fixed prefix; an input-conditioned prefix (kind dynamic) has "
                             "a K/V per input (set compress.enabled: false)")
        kv = prefix.key_values(model).detach().float().cpu()
        ids = getattr(prefix, "init_ids", None)
        use_anchor = bool(ids) and model is not None if anchor == "auto" else bool(anchor)
        anchor_kv = None
        if use_anchor:
            if not ids or model is None:
                raise ValueError("anchored compression needs a prefix initialised from text (init_ids) and the model")
            anchor_kv = text_kv(model, ids)
            kv = kv - anchor_kv
        blocks = to_blocks(kv, scope)
        factors, shapes = [], []
        for b in blocks:
            u, s, vh = torch.linalg.svd(b, full_matrices=False)
            r = choose_rank(s, rank, energy, allow_zero=use_anchor)
            factors.append((u[:, :r] * s[:r], vh[:r]))
            shapes.append((b.shape[0], r, b.shape[1]))
        out = cls(prefix.spec, prefix.length, scope, shapes, ids if use_anchor else None, dtype)
        for i, (u, v) in enumerate(factors):
            out.u[i].data.copy_(u)
            out.v[i].data.copy_(v)
        if anchor_kv is not None:
            out.anchor = anchor_kv  # already computed: key_values() need not run the model again
        return out.to(getattr(prefix, "device", torch.device("cpu")))

    @classmethod
    def from_config(cls, spec: KVSpec, cfg: dict) -> "CompressedPrefix":
        return cls(spec, cfg["length"], cfg["scope"], [tuple(s) for s in cfg["shapes"]], cfg.get("anchor_ids"),
                   cfg.get("dtype", "float32"))

    def config_dict(self) -> dict:
        return {"kind": self.kind, "length": self.length, "scope": self.scope, "shapes": [list(s) for s in self.shapes],
                "ranks": self.ranks, "anchor_ids": self.anchor_ids, "dtype": self.dtype_name}

    def key_values(self, model=None) -> torch.Tensor:
        kv = from_blocks([u.float() @ v.float() for u, v in zip(self.u, self.v)], self.scope, self.spec, self.length)
        if self.anchor_ids:
            if self.anchor.numel() == 0:
                if model is None:
                    raise ValueError("this compressed prefix is anchored on the model's own K/V for "
                                     f"{len(self.anchor_ids)} tokens: pass the model to rebuild them")
                self.anchor = text_kv(model, self.anchor_ids).to(kv.device)
            kv = kv + self.anchor.to(kv.device)
        return kv

    @torch.no_grad()
    def merge(self, model=None):
        """Reconstruct once into a plain "kv" Prefix (what generation uses when loaded for speed)."""
        return Prefix(self.spec, self.length, "kv", init_kv=self.key_values(model).float().cpu(),
                      init_ids=self.anchor_ids).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.u[0].device if len(self.u) else torch.device("cpu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def full_parameters(self) -> int:
        return self.spec.num_layers * 2 * self.length * self.spec.kv_dim

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def compression_ratio(self) -> float:
        """Bytes of the full float32 K/V over the bytes stored here (anchor ids cost a few bytes in the manifest)."""
        return self.full_parameters() * 4 / max(self.nbytes(), 1)

    def save(self, path, metadata: dict | None = None, *, overwrite: bool = False) -> None:
        """Write the prefix to directory `path`; only a previous rlprefix artifact there is replaced, unless
        `overwrite`. Record the base model as `metadata["model"]` so tools can find it."""
        save_prefix(self, path, metadata, overwrite=overwrite)


def compress(prefix, rank: int | None = None, energy: float | None = None, scope: Scope = "shared",
             model=None, anchor: bool | str = "auto", dtype: str = "float32") -> CompressedPrefix:
    """Truncated SVD of a prefix, by fixed `rank` or smallest rank keeping `energy` of the spectrum.

    With `model` and a prefix initialised from text, only the change from the text's K/V is factorised
    (`anchor="auto"`); `dtype` float16/bfloat16 stores the factors in half the bytes.
    """
    return CompressedPrefix.from_prefix(prefix, model, rank=rank, energy=energy, scope=scope, anchor=anchor,
                                        dtype=dtype)


def reconstruction_error(full, compressed, model=None) -> list[float]:
    """Relative Frobenius error of K and V together, per layer."""
    a = full.key_values(model).detach().float().cpu()
    b = compressed.key_values(model).detach().float().cpu()
    return [((a[l] - b[l]).norm() / a[l].norm().clamp(min=1e-12)).item() for l in range(a.shape[0])]


_LOWRANK_FIELDS = {"length", "scope", "shapes", "ranks", "anchor_ids", "dtype"}


def _from_manifest(spec: KVSpec, kind: str, cfg: dict) -> CompressedPrefix:
    unknown = set(cfg) - _LOWRANK_FIELDS
    if unknown:
        raise TypeError(f"unknown config field(s) {sorted(unknown)}")
    rows_per = spec.num_layers if cfg.get("scope") == "shared" else 1
    if any(rows != rows_per * cfg["length"] for rows, _, _ in cfg["shapes"]):
        raise ValueError(f"length {cfg['length']} disagrees with the factor shapes {cfg['shapes']}")
    return CompressedPrefix.from_config(spec, cfg)


register_kind(("lowrank",), _from_manifest)
