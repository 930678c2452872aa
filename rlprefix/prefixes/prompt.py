"""The "prompt" kind, the Prompt Tuning baseline: `length` input-embedding virtual tokens [length, hidden]. Its K/V are
what the frozen model computes for those embeddings (differentiably), so it plugs into the same cache machinery; a
family without input-embedding prefixes (encoder-decoder models) refuses it."""
from __future__ import annotations

import torch
from torch import nn

from rlprefix.distributed import collectives
from rlprefix.models import family_of


def build(prefix, randn) -> None:
    family_of(prefix.spec).require("prompt_prefix", hint=f"{prefix.spec.describe()}; use kind 'kv', 'mlp' or 'shared'")
    prefix.embeds = nn.Parameter(randn(prefix.length, prefix.spec.hidden_size))


@torch.no_grad()
def init_from_ids(prefix, model, ids: torch.Tensor) -> None:
    """Start at the embeddings of real tokens `ids` [1, length]."""
    with collectives.gathered(model):  # a sharded model's embedding table is gathered for this direct call
        prefix.embeds.data.copy_(model.get_input_embeddings()(ids)[0].float())


def key_values(prefix, model=None) -> torch.Tensor:
    spec = prefix.spec
    if model is None:
        raise ValueError("a 'prompt' prefix needs the model to compute its K/V")
    if prefix.length == 0:
        return prefix.embeds.new_zeros(spec.num_layers, 2, 0, spec.kv_dim)
    return family_of(model).embeds_kv(model, prefix.embeds)
