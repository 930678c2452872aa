"""The input-conditioned prefix (`kind: dynamic`): a bank of B plain K/V prefixes and a router that mixes them
per input.

    w(x)     = softmax(W · LN(mean input embedding of the prompt x - centre) + b)        [B]
    K/V(x)   = sum_b w_b(x) · bank_b                                              [layers, 2, length, kv_dim]

A static prefix steers every input the same way; when the best prefix depends on the input (two tasks told
apart by the prompt), a per-row convex mixture of a small bank lets each input get its own. The router reads the
frozen model's input embeddings of the prompt tokens (the rendered prompt, chat template included, as at
generation), averaged over the prompt, minus a fixed `centre` and layer-normalised (no affine), so its scale does
not depend on the embedding table's. The centre (a buffer, saved with the prefix) is the average prompt's mean
embedding, fitted once on the training prompts when a warm start begins (`fit_centre`, only while it is unset):
without it the chat template's shared tokens dominate every prompt's features and the router tends to move all
prompts the same way (measured: it collapsed onto one entry). A row with no prompt token (plain general text mixed into the warm start) routes on a zero
vector, i.e. on the router's bias alone.

Trainable parameters: B · layers · 2 · length · kv_dim (the bank) + (hidden + 1) · B (the router): with B = 1 it
is exactly a "kv" prefix (softmax over one entry is 1). From text every entry starts at the text's K/V, plus,
when B > 1, a little noise (init_std) that breaks the symmetry between entries (identical entries would get
identical gradients forever).

What it supports: the warm start (bank and router trained together, the route mask being the prompt tokens,
labels -100), generation on the rollout engine (each row's mixed prefix goes into the engine's per-row
`PrefixBank`), held-out evaluation, PPO with `reference: base` (rollouts on the same per-row path; the training
forward routes on the prompt part, also when prompts are shared, so the first ratio is 1), saving and loading
(the artifact format, the architecture fingerprint checked). What it refuses, with an error saying so: PPO's
`reference: initial` (it keeps one fixed reference K/V), merging and compression (no single K/V), and PEFT
export (PEFT prefix tuning stores one fixed [length, layers · 2 · kv_dim] table for every input; an
input-conditioned prefix cannot be written as one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlprefix.distributed import collectives as sharding
from rlprefix.prefixes.artifacts import register_kind, save_prefix
from rlprefix.models.spec import KVSpec

# What an input-conditioned prefix (dynamic, image) cannot do, and why: the one wording of every refusal (the API's, the config's, the server's).
WHAT = "an input-conditioned prefix (kind dynamic or image)"
REFUSALS = {
    "single_kv": f"{WHAT} has no single K/V: its K/V depend on each input, a prompt or an image (per-row K/V "
                 f"come from its prompts or images); it cannot be merged, compressed, exported to PEFT or kept as one "
                 f"fixed K/V",
    "merge": f"{WHAT} cannot be merged: its parameters are already its final form (no single K/V)",
    "compress": f"compression factorises one fixed prefix; {WHAT} has a K/V per input (set compress.enabled: false)",
    "peft": f"PEFT prefix tuning cannot express {WHAT}: a PEFT adapter holds one fixed prefix for every input, this "
            f"prefix's K/V change with each input; export it in the rlprefix format instead "
            f"(export.formats: [rlprefix])",
    "bank": f"{WHAT}'s K/V depend on each input, so it cannot share a bank with other prefixes (or the base model) "
            f"or join an ensemble; pass it alone as `prefix`",
}
NOT_STATIC = REFUSALS["single_kv"]


def refusal(what: str, name: str | None = None) -> str:
    """The reason a dynamic prefix refuses `what` (a key of REFUSALS), naming the prefix when `name` is given."""
    return f"{name}: {REFUSALS[what]}" if name else REFUSALS[what]


class DynamicPrefix(nn.Module):
    """A bank of `bank_size` K/V prefixes of `length` tokens and a linear router on the prompt's mean embedding."""

    kind = "dynamic"
    input_conditioned = True

    def __init__(self, spec: KVSpec, length: int, bank_size: int = 4, *, init_kv: torch.Tensor | None = None,
                 init_std: float = 0.02, generator: torch.Generator | None = None, init_ids: list[int] | None = None,
                 **_ignored):
        super().__init__()
        if bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {bank_size}")
        if length < 1:
            raise ValueError(f"a dynamic prefix needs length >= 1, got {length}")
        self.spec, self.length, self.bank_size = spec, int(length), int(bank_size)
        self.init_ids = [int(i) for i in init_ids] if init_ids else None
        shape = (spec.num_layers, 2, self.length, spec.kv_dim)
        if init_kv is not None and tuple(init_kv.shape) != shape:
            raise ValueError(f"init_kv has shape {tuple(init_kv.shape)}, this prefix needs {shape}")
        noise = torch.randn(self.bank_size, *shape, generator=generator) * init_std
        if init_kv is not None:
            bank = init_kv.detach().float().unsqueeze(0).repeat(self.bank_size, 1, 1, 1, 1)
            if self.bank_size > 1:
                bank = bank + noise
        else:
            bank = noise
        self.bank = nn.Parameter(bank)
        self.router = nn.Linear(spec.hidden_size, self.bank_size)
        self.register_buffer("centre", torch.zeros(spec.hidden_size))
        with torch.no_grad():  # nn.Linear's default init, drawn from `generator` (deterministic)
            bound = spec.hidden_size ** -0.5
            self.router.weight.copy_((torch.rand(self.router.weight.shape, generator=generator) * 2 - 1) * bound)
            self.router.bias.zero_()

    # --- the router and the per-row K/V ---------------------------------------------------------------------
    def mean_embedding(self, model, input_ids: torch.Tensor, route_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows, hidden] mean input embedding of the tokens where `route_mask` is 1, [rows] whether a row has any)."""
        with sharding.gathered(model):
            emb = model.get_input_embeddings()(input_ids.to(model.device)).float()
        m = route_mask.to(emb.device).float().unsqueeze(-1)
        return (emb * m).sum(1) / m.sum(1).clamp(min=1), m.sum((1, 2)) > 0

    def features(self, model, input_ids: torch.Tensor, route_mask: torch.Tensor) -> torch.Tensor:
        """[rows, hidden]: layer-normalised (mean input embedding - centre) of the routed tokens (zeros for a row
        without any)."""
        mean, has = self.mean_embedding(model, input_ids, route_mask)
        x = mean - self.centre.to(mean.device)
        return F.layer_norm(x, x.shape[-1:]) * has.float().unsqueeze(-1)

    @torch.no_grad()
    def fit_centre(self, model, batches) -> None:
        """Set the centre to the average mean embedding over (input_ids, route_mask) batches of training prompts."""
        total, count = None, 0
        for ids, mask in batches:
            mean, has = self.mean_embedding(model, ids, mask)
            part = mean[has].sum(0)
            total, count = part if total is None else total + part, count + int(has.sum())
        if count:
            self.centre.copy_((total / count).to(self.centre))

    def weights(self, model, input_ids: torch.Tensor, route_mask: torch.Tensor) -> torch.Tensor:
        """[rows, bank_size]: each row's mixture weights (a softmax: non-negative, summing to 1)."""
        feats = self.features(model, input_ids, route_mask).to(self.router.weight.device)
        return torch.softmax(self.router(feats), dim=-1)

    def key_values(self, model=None, input_ids: torch.Tensor | None = None,
                   route_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, layers, 2, length, kv_dim]: each row's mixture of the bank (keys as they enter the cache)."""
        if input_ids is None or model is None:
            raise ValueError(NOT_STATIC)
        if route_mask is None:
            route_mask = torch.ones_like(input_ids)
        w = self.weights(model, input_ids, route_mask)
        return torch.einsum("rb,blckd->rlckd", w, self.bank)

    def merge(self, model=None) -> "DynamicPrefix":
        """Refused: there is no single K/V to merge into (the warm start and the recipe keep a dynamic prefix as it
        is: its bank is already plain K/V)."""
        raise ValueError(refusal("merge"))

    # --- what every prefix offers --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.bank.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"kind=dynamic, bank_size={self.bank_size}, length={self.length}, spec=({self.spec.describe()})"

    def config_dict(self) -> dict:
        return {"kind": "dynamic", "length": self.length, "bank_size": self.bank_size, "init_ids": self.init_ids}

    def save(self, path, metadata: dict | None = None, *, overwrite: bool = False) -> None:
        """The artifact format of every prefix (safetensors + manifest with the architecture fingerprint)."""
        save_prefix(self, path, metadata, overwrite=overwrite)


def is_input_conditioned(prefix) -> bool:
    """True for a prefix whose K/V depend on the input (kind dynamic)."""
    return bool(getattr(prefix, "input_conditioned", False))


def dynamic_parameter_count(spec: KVSpec, length: int, bank_size: int) -> int:
    """The bank plus the router."""
    return bank_size * spec.num_layers * 2 * length * spec.kv_dim + (spec.hidden_size + 1) * bank_size


def _from_manifest(spec: KVSpec, kind: str, cfg: dict) -> DynamicPrefix:
    cfg = dict(cfg)
    return DynamicPrefix(spec, cfg.pop("length"), cfg.pop("bank_size"), init_ids=cfg.pop("init_ids", None))


register_kind(("dynamic",), _from_manifest)
