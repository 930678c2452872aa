"""The image-conditioned prefix (`kind: image`): a frozen image encoder's feature of each row's image, a mapping
network, and that row's prefix (the cross-modal prefix of ClipCap, Mokady et al. 2021; Frozen, Tsimpoukelli et al.
2021; LiMBeR, Merullo et al. 2023).

    z(x)        = (f(x) - mean) / std                           the encoder's feature, standardised   [feature_dim]
    h(x)        = tanh(W1 z + b1)                                the mapper's hidden layer              [hidden]
    form "kv":        K/V(x) = base + sum_b c_b(x) basis_b,      c = W2 h + b2                          [basis]
    form "embedding": E(x)   = base_embeds + (W2 h + b2).view(length, hidden_size); K/V(x) = the frozen model's
                      K/V of E(x) (the ClipCap/Frozen prefix: mapped tokens as input embeddings before the prompt)

Both forms end as per-row K/V [rows, layers, 2, length, kv_dim] on the input-conditioned path the dynamic prefix
uses (the engine's per-row `PrefixBank`, per-row caches in scoring and the warm start), so every stage treats them
alike. The "kv" form writes every layer's K/V directly through a learned basis (`basis` entries, starting small and
random; `base` starts at a text's K/V); the "embedding" form reaches the layers only through the frozen model's own
pass over the mapped tokens (with gradients), as prompt tuning does.

The prefix never holds the encoder: its features arrive as a condition tensor [rows, feature_dim], which
`bind(features)` attaches for one batch (`BoundImagePrefix`, the object the stages pass on: it answers like a
dynamic prefix and shares this prefix's parameters). Which encoder made the features is recorded as `encoder` (a
reference, never weights: `rlprefix.images.open_encoder` finds it again), with `feature_dim` checked on every
batch. The standardisation (`mean`, `std`, buffers saved with the prefix) is fitted once on the training images
(`fit_features`), so the mapper's input scale does not depend on the encoder's.

What it refuses, with the dynamic prefix's wording where it is the same reason: merging, compression, PEFT export,
sharing a bank with other prefixes; and encoder-decoder models
(decoder-only models only, for now).
"""
from __future__ import annotations

import torch
from torch import nn

from rlprefix.distributed import collectives
from rlprefix.models import family_of, text_kv
from rlprefix.models.spec import KVSpec, kv_spec
from rlprefix.prefixes.artifacts import register_kind, save_prefix
from rlprefix.prefixes.dynamic import refusal

FORMS = ("kv", "embedding")
WHAT = "an image prefix"
NEEDS_IMAGES = (f"{WHAT} needs an image per row: pass images= (or bind the encoder's features with "
                f"prefix.bind(features))")


class ImagePrefix(nn.Module):
    """A mapper from an image feature [feature_dim] to a prefix of `length` tokens, in form "kv" or "embedding"."""

    kind = "image"
    input_conditioned = True

    def __init__(self, spec: KVSpec, length: int, feature_dim: int, *, form: str = "kv", basis: int = 16,
                 hidden: int = 512, encoder: str | None = None, init_kv: torch.Tensor | None = None,
                 init_embeds: torch.Tensor | None = None, init_ids: list[int] | None = None, init_std: float = 0.02,
                 generator: torch.Generator | None = None):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"an image prefix's form must be one of {FORMS}, got {form!r}")
        if length < 1 or feature_dim < 1 or basis < 1 or hidden < 1:
            raise ValueError(f"an image prefix needs length, feature_dim, basis and hidden >= 1 (got {length}, "
                             f"{feature_dim}, {basis}, {hidden})")
        family_of(spec).require("image_prefix", hint=f"{spec.describe()}; image prefixes steer decoder-only models")
        self.spec, self.length, self.feature_dim, self.form = spec, int(length), int(feature_dim), form
        self.basis_size, self.hidden, self.encoder = int(basis), int(hidden), encoder
        self.init_ids = [int(i) for i in init_ids] if init_ids else None

        def randn(*size, std=init_std):
            return torch.randn(*size, generator=generator) * std

        kv_shape = (spec.num_layers, 2, self.length, spec.kv_dim)
        out = self.basis_size if form == "kv" else self.length * spec.hidden_size
        self.register_buffer("mean", torch.zeros(self.feature_dim))
        self.register_buffer("std", torch.ones(self.feature_dim))
        self.mapper = nn.Sequential(nn.Linear(self.feature_dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, out))
        with torch.no_grad():  # deterministic from `generator`: Xavier-like first layer, a small last layer
            self.mapper[0].weight.copy_(randn(self.hidden, self.feature_dim, std=self.feature_dim ** -0.5))
            self.mapper[0].bias.zero_()
            # kv: coefficients of order 0.5 over a basis at a tenth of the K/V's scale (both get gradients);
            # embedding: mapped tokens start near the base embeddings
            self.mapper[2].weight.copy_(randn(out, self.hidden, std=(1.0 if form == "kv" else init_std)
                                              * self.hidden ** -0.5))
            self.mapper[2].bias.zero_()
        if form == "kv":
            self.base = nn.Parameter(_start(init_kv, kv_shape, randn, "init_kv"))
            scale = 0.1 * float(init_kv.float().std()) if init_kv is not None else init_std
            self.basis = nn.Parameter(randn(self.basis_size, *kv_shape, std=scale))
        else:
            self.base_embeds = nn.Parameter(_start(init_embeds, (self.length, spec.hidden_size), randn,
                                                   "init_embeds"))

    @classmethod
    @torch.no_grad()
    def from_ids(cls, model, ids: list[int], feature_dim: int, **kw) -> "ImagePrefix":
        """Start at real words `ids` (one per prefix token): form "kv" at the frozen model's K/V of them, form
        "embedding" at their input embeddings; the image then moves the prefix away from that start."""
        spec, form = kv_spec(model), kw.get("form", "kv")
        if form == "kv":
            kw["init_kv"] = text_kv(model, ids)
        else:
            with collectives.gathered(model):
                kw["init_embeds"] = model.get_input_embeddings()(torch.tensor([ids], device=model.device))[0].float().cpu()
        return cls(spec, len(ids), feature_dim, init_ids=ids, **kw)

    # --- the condition: image features -> standardised input of the mapper ----------------------------------
    @torch.no_grad()
    def fit_features(self, features: torch.Tensor) -> None:
        """Standardise with the mean and std of the training images' features (once, before training)."""
        feats = self._checked(features).float()
        self.mean.copy_(feats.mean(0).to(self.mean))
        self.std.copy_(feats.std(0, unbiased=False).clamp(min=1e-4).to(self.std) if len(feats) > 1
                       else torch.ones_like(self.std))

    def _checked(self, features) -> torch.Tensor:
        if features is None:
            raise ValueError(NEEDS_IMAGES)
        feats = torch.as_tensor(features)
        if feats.dim() != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"{WHAT} takes image features [rows, {self.feature_dim}] from its encoder "
                             f"({self.encoder or 'rlprefix-small-cnn'}); got shape {tuple(feats.shape)}")
        return feats

    def coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """The mapper's output for standardised features: [rows, basis] (kv) or [rows, length, hidden] (embedding)."""
        dev = self.mean.device
        z = (self._checked(features).to(dev).float() - self.mean) / self.std
        out = self.mapper(z)
        return out if self.form == "kv" else out.view(-1, self.length, self.spec.hidden_size)

    def key_values(self, model=None, input_ids=None, route_mask=None, *, features=None) -> torch.Tensor:
        """[rows, layers, 2, length, kv_dim]: each row's prefix for its image's `features` [rows, feature_dim]."""
        if features is None:
            raise ValueError(NEEDS_IMAGES)
        out = self.coefficients(features)
        if input_ids is not None and input_ids.shape[0] != out.shape[0]:
            raise ValueError(f"{WHAT} got {out.shape[0]} images for {input_ids.shape[0]} rows; pass one image per row")
        if self.form == "kv":
            return self.base.unsqueeze(0) + torch.einsum("rb,blckd->rlckd", out, self.basis)
        if model is None:
            raise ValueError(f"{WHAT} of form 'embedding' needs the model to compute its K/V")
        return family_of(model).embeds_kv(model, self.base_embeds.unsqueeze(0) + out)

    def bind(self, features: torch.Tensor) -> "BoundImagePrefix":
        """This prefix with one batch's image features attached (rows in the batch's order)."""
        return BoundImagePrefix(self, self._checked(features))

    def merge(self, model=None):
        raise ValueError(refusal("merge"))

    # --- what every prefix offers --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.mean.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return (f"kind=image, form={self.form}, length={self.length}, feature_dim={self.feature_dim}, "
                f"encoder={self.encoder or 'rlprefix-small-cnn'}, spec=({self.spec.describe()})")

    def config_dict(self) -> dict:
        return {"kind": "image", "length": self.length, "form": self.form, "feature_dim": self.feature_dim,
                "basis": self.basis_size, "hidden": self.hidden, "encoder": self.encoder, "init_ids": self.init_ids}

    def save(self, path, metadata: dict | None = None, *, overwrite: bool = False) -> None:
        """The artifact format of every prefix: the mapper, base (and basis) and the feature standardisation in
        safetensors; form, sizes and the encoder's reference in the manifest (never the encoder's weights)."""
        save_prefix(self, path, metadata, overwrite=overwrite)


class BoundImagePrefix:
    """An image prefix with one batch's features attached: what warm start, rollouts, scoring and evaluation
    pass around. It is input-conditioned like a dynamic prefix (per-row K/V), and trains the prefix it wraps."""

    input_conditioned = True
    kind = "image"

    def __init__(self, prefix: ImagePrefix, features: torch.Tensor):
        self.prefix, self.features = prefix, features
        self.spec, self.length = prefix.spec, prefix.length

    def key_values(self, model=None, input_ids=None, route_mask=None) -> torch.Tensor:
        return self.prefix.key_values(model, input_ids, route_mask, features=self.features)

    def select(self, rows) -> "BoundImagePrefix":
        """The same prefix for a subset of the rows (a minibatch)."""
        index = torch.as_tensor(list(rows) if isinstance(rows, range) else rows, device=self.features.device)
        return BoundImagePrefix(self.prefix, self.features[index])

    def __len__(self) -> int:
        return len(self.features)

    def parameters(self):
        return self.prefix.parameters()

    def num_parameters(self) -> int:
        return self.prefix.num_parameters()

    def eval(self):
        self.prefix.eval()
        return self

    def train(self, mode: bool = True):
        self.prefix.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.prefix.device


def _start(init: torch.Tensor | None, shape: tuple, randn, name: str) -> torch.Tensor:
    if init is None:
        return randn(*shape)
    if tuple(init.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(init.shape)}, this prefix needs {tuple(shape)}")
    return init.detach().float().clone()


def _from_manifest(spec: KVSpec, kind: str, cfg: dict) -> ImagePrefix:
    cfg = dict(cfg)
    return ImagePrefix(spec, cfg.pop("length"), cfg.pop("feature_dim"), **cfg)


register_kind(("image",), _from_manifest)

