"""The "mlp" kind, the Prefix-Tuning training recipe (Li & Liang 2021): P = base + MLP(P_theta), with P_theta
[length, mlp_input_dim] and a two-layer tanh MLP to every layer's K/V in one row per virtual token (PEFT's layout,
`rlprefix.prefixes.layout`). With init K/V the last layer starts at zero, so the prefix starts exactly at them."""
from __future__ import annotations

import torch
from torch import nn

from rlprefix.prefixes.layout import rows_to_kv


def build(prefix, shape: tuple, init_kv: torch.Tensor | None, generator: torch.Generator | None) -> None:
    spec = prefix.spec
    out_dim = spec.num_layers * 2 * spec.kv_dim
    prefix.p_theta = nn.Parameter(torch.randn(prefix.length, prefix.mlp_input_dim, generator=generator))
    prefix.mlp = nn.Sequential(nn.Linear(prefix.mlp_input_dim, prefix.mlp_hidden), nn.Tanh(),
                               nn.Linear(prefix.mlp_hidden, out_dim))
    with torch.no_grad():  # deterministic init under `generator`
        for lin in (prefix.mlp[0], prefix.mlp[2]):
            bound = lin.in_features ** -0.5
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=generator) * 2 * bound - bound)
            lin.bias.zero_()
        if init_kv is not None:  # start exactly at the given K/V: base + MLP(.) with a zero last layer
            prefix.mlp[2].weight.zero_()
    prefix.register_buffer("base", init_kv.detach().clone().float() if init_kv is not None else torch.zeros(shape))


def key_values(prefix, model=None) -> torch.Tensor:
    return prefix.base + rows_to_kv(prefix.mlp(prefix.p_theta), prefix.spec.num_layers)
