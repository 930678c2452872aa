"""The layer-shared prefix (`kind: shared`): one matrix shared by every layer, mapped to each layer's K/V.

    K/V of layer l = base^(l) + P_shared W^(l)      P_shared [length, d], W^(l) [d, 2 * kv_dim]

Trainable parameters: length * d + layers * d * 2 * kv_dim, against layers * 2 * length * kv_dim for plain
"kv" per-layer prefixes, i.e. about d / length of them; with the default d = ceil(length / 4) that is ~70-75%
fewer (SmolLM2-135M, length 10, d 3: 34,590 vs 115,200). Seen in PEFT's layout [length, layers * 2 * kv_dim]
(`rlprefix.prefixes.layout.kv_to_rows`), P_shared W is a rank-d matrix whose left factor all layers share: the trainable
counterpart of compression's `whole` scope. d >= length removes the constraint (any K/V is reachable).

Initialisation from K/V (`init: text`): the best rank-d fit of the text's K/V in that layout (truncated SVD,
the singular values split evenly: P_shared = U S^1/2, W = S^1/2 V^T, the least-squares optimum) fills P_shared
and W, and `base`, a fixed buffer, holds what the fit leaves out. The prefix therefore starts exactly at the
text's K/V, like the other kinds, and gradients reach both factors from the first step. Without init K/V the
base is zero and P_shared W starts ~N(0, init_std^2) entry-wise, like a random "kv" prefix.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rlprefix.models.spec import KVSpec
from rlprefix.prefixes.layout import kv_to_rows


def default_shared_dim(length: int) -> int:
    """d when none is given: a quarter of the length, rounded up (at least 1)."""
    return max(1, math.ceil(int(length) / 4))


def shared_parameter_count(spec: KVSpec, length: int, dim: int) -> int:
    """Trainable parameters of a shared prefix: P_shared plus one map per layer."""
    return length * dim + spec.num_layers * dim * 2 * spec.kv_dim


@torch.no_grad()
def init_shared(spec: KVSpec, length: int, dim: int, init_kv: torch.Tensor | None = None, init_std: float = 0.02,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P_shared [length, d], maps [layers, d, 2 * kv_dim], base [layers, 2, length, kv_dim]) such that
    `shared_key_values(...)` equals `init_kv` (up to float rounding), or is random and small without it."""
    if dim < 1:
        raise ValueError(f"shared_dim must be >= 1, got {dim}")
    layers, width = spec.num_layers, 2 * spec.kv_dim
    p = torch.randn(length, dim, generator=generator)
    maps = torch.randn(layers, dim, width, generator=generator) * (init_std / math.sqrt(dim))
    if init_kv is None:
        return p, maps, torch.zeros(layers, 2, length, spec.kv_dim)
    init_kv = init_kv.detach().float().cpu()
    u, s, vh = torch.linalg.svd(kv_to_rows(init_kv), full_matrices=False)
    k = min(dim, s.numel())
    root = s[:k].sqrt()
    p[:, :k] = u[:, :k] * root
    maps[:, :k] = (root[:, None] * vh[:k]).view(k, layers, width).transpose(0, 1)
    # the rest of the text's K/V (zero when d >= length, up to the random extra columns): fixed, so init is exact
    base = init_kv - shared_key_values(p, maps, torch.zeros_like(init_kv))
    return p, maps, base


def shared_key_values(p: torch.Tensor, maps: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """base + P_shared W^(l) for every layer, as [layers, 2, length, kv_dim]."""
    layers, length, kv_dim = maps.shape[0], p.shape[0], base.shape[-1]
    out = torch.einsum("pd,ldk->lpk", p, maps).view(layers, length, 2, kv_dim)
    return base + out.permute(0, 2, 1, 3)


def build(prefix, init_kv: torch.Tensor | None, init_std: float, generator: torch.Generator | None,
          shared_dim: int | None) -> None:
    prefix.shared_dim = int(shared_dim) if shared_dim is not None else default_shared_dim(prefix.length)
    p, maps, base = init_shared(prefix.spec, prefix.length, prefix.shared_dim, init_kv, init_std, generator)
    prefix.p_shared, prefix.maps = nn.Parameter(p), nn.Parameter(maps)
    prefix.register_buffer("base", base)


def key_values(prefix, model=None) -> torch.Tensor:
    return shared_key_values(prefix.p_shared, prefix.maps, prefix.base)
