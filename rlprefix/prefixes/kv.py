"""The "kv" kind: plain per-layer K/V tensors [layers, 2, length, kv_dim], one parameter. What `Prefix.merge()`
produces for inference and RL, and what every other kind's `key_values` evaluates to."""
from __future__ import annotations

import torch
from torch import nn


def build(prefix, shape: tuple, init_kv: torch.Tensor | None, randn) -> None:
    prefix.kv = nn.Parameter(init_kv.detach().clone().float() if init_kv is not None else randn(*shape))


def key_values(prefix, model=None) -> torch.Tensor:
    return prefix.kv
