"""The one K/V <-> token-row layout: rlprefix's [layers, 2, length, kv_dim] and PEFT's `prompt_embeddings`
[length, layers * 2 * kv_dim] (one row per virtual token; viewed as [length, 2 * layers, kv_heads, head_dim], row 2l
is layer l's key and 2l + 1 its value). The "mlp" kind's output, the "shared" kind's initialisation, "whole"-scope
compression and the PEFT conversion all go through these two functions.
"""
from __future__ import annotations

import torch


def kv_to_rows(kv: torch.Tensor) -> torch.Tensor:
    """[layers, 2, length, kv_dim] -> [length, layers * 2 * kv_dim]."""
    layers, two, length, kv_dim = kv.shape
    return kv.permute(2, 0, 1, 3).reshape(length, layers * two * kv_dim)


def rows_to_kv(rows: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[length, layers * 2 * kv_dim] -> [layers, 2, length, kv_dim] (a view when it can be; inverse of kv_to_rows)."""
    return rows.view(rows.shape[0], num_layers, 2, -1).permute(1, 2, 0, 3)
