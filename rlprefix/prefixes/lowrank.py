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

The defaults (scope, anchoring, factor dtype) are defined once, in `CompressConfig`: `compress()`, the run's
`compress` config section and `rlprefix compress` all read them there.

Choosing a rank by its effect on the model (a KL budget) and measuring what a compression keeps is the
compression stage, `rlprefix.train.compress`.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rlprefix.prefixes.artifacts import register_kind, save_prefix
from rlprefix.prefixes.dynamic import REFUSALS
from rlprefix.models.spec import KVSpec, resolve_dtype
from rlprefix.prefixes.prefix import Prefix
from rlprefix.models.adapter import text_kv
from rlprefix.prefixes.layout import kv_to_rows, rows_to_kv
from rlprefix.settings import Settings, setting

Scope = Literal["matrix", "shared", "whole"]
SCOPES: tuple[str, ...] = typing.get_args(Scope)
FactorDtype = Literal["float32", "float16", "bfloat16"]

# The factor dtype of an artifact whose manifest records none: those were written before factors could be stored in
# half precision. What reading such a manifest assumes -- not a default of a new compression (CompressConfig.dtype).
UNRECORDED_DTYPE = "float32"


@dataclass
class CompressConfig(Settings):
    """How a prefix is factorised, with the one set of defaults: `compress()` and `compress_to_budget()` take theirs
    from these fields, the run's `compress` section extends this class, and `rlprefix compress` reads its option
    defaults from it. `anchor: true` is `compress(anchor="auto")`: anchored whenever the prefix has init text."""
    section = "compress"
    scope: Scope = setting("matrix", "what one factorisation covers")
    anchor: bool = setting(True, "factorise only the change from the init text's K/V (when there is one)")
    dtype: FactorDtype = setting("float16", "storage of the factors")


def anchor_mode(anchor: bool) -> bool | str:
    """`compress()`'s `anchor` for a settings' `anchor`: "auto" (when the prefix has init text) or False."""
    return "auto" if anchor else False


def to_blocks(kv: torch.Tensor, scope: Scope) -> list[torch.Tensor]:
    """[L, 2, P, D] -> the list of matrices that `scope` factorises."""
    L, _, P, D = kv.shape
    if scope == "matrix":
        return [kv[layer, i] for layer in range(L) for i in (0, 1)]
    if scope == "shared":
        return [kv[:, i].reshape(L * P, D) for i in (0, 1)]
    if scope == "whole":
        return [kv_to_rows(kv)]
    raise ValueError(f"unknown compression scope {scope!r}; use one of {SCOPES}")


def from_blocks(blocks: list[torch.Tensor], scope: Scope, spec: KVSpec, length: int) -> torch.Tensor:
    """Inverse of `to_blocks`."""
    L, D, P = spec.num_layers, spec.kv_dim, length
    if scope == "matrix":
        return torch.stack([torch.stack([blocks[2 * layer], blocks[2 * layer + 1]]) for layer in range(L)])
    if scope == "shared":
        return torch.stack([b.view(L, P, D) for b in blocks], dim=1)
    return rows_to_kv(blocks[0], L)


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
                 anchor_ids: list[int] | None = None, dtype: str = UNRECORDED_DTYPE):
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
                    scope: Scope = CompressConfig.scope, anchor: bool | str = anchor_mode(CompressConfig.anchor),
                    dtype: str = CompressConfig.dtype) -> "CompressedPrefix":
        if getattr(prefix, "input_conditioned", False):
            raise ValueError(REFUSALS["compress"])
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
                   cfg.get("dtype", UNRECORDED_DTYPE))

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


def compress(prefix, rank: int | None = None, energy: float | None = None, scope: Scope = CompressConfig.scope,
             model=None, anchor: bool | str = anchor_mode(CompressConfig.anchor),
             dtype: str = CompressConfig.dtype) -> CompressedPrefix:
    """Truncated SVD of a prefix, by fixed `rank` or smallest rank keeping `energy` of the spectrum (full rank
    when neither).

    With `model` and a prefix initialised from text, only the change from the text's K/V is factorised
    (`anchor="auto"`); `dtype` float16/bfloat16 stores the factors in half the bytes of float32. The defaults are
    `CompressConfig`'s (those of `rlprefix run` and `rlprefix compress`).
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
