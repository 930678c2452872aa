"""The model-family adapter's interface: everything that differs between decoder-only and encoder-decoder models.

One `ModelFamily` object is picked per model (`rlprefix.models.adapter.family_of`, from `config.is_encoder_decoder`)
and owns: building the prefix cache from plain K/V tensors, the frozen model's own K/V of a text, the supervised
forward, scoring completions, the reference sampling loop, the decoder start token of supervised examples, the PEFT
task type, and what the family supports. Code outside `rlprefix.models` never asks which family it holds: it calls
the family, or asks `family.require(feature)` for a clear refusal.

It is also the one compatibility point with transformers' cache argument: `call` passes the cache under the keyword
the model's forward takes (`cache` from transformers 5.24 on, `past_key_values` before, where a `cache=` keyword would
be swallowed silently), and `output_cache` reads it back from the outputs the same way, so no rlprefix call triggers
the rename's deprecation warning and none can be swallowed by `**kwargs` once the old name is gone.
"""
from __future__ import annotations

import functools
import inspect

import torch

from rlprefix.models.spec import KVSpec, ModelMismatchError, kv_spec

# what a family may lack, and the words a refusal uses for it
FEATURES = {
    "prompt_prefix": "a 'prompt' prefix (input embeddings)",
    "fsdp": "distributed strategy 'fsdp'",
    "engine": "the static-cache rollout engine",
    "ensemble": "prompt ensembling (groups > 1)",
    "on_step": "on_step (streaming, cancelling)",
    "serve": "rlprefix serve (continuous batching)",
    "general_text": "general-text mixing (plain language-model text has no source)",
    "image_prefix": "an image prefix (kind image)",
}


class ModelFamily:
    """Base of `DecoderOnly` (rlprefix/models/decoder_only.py) and `EncoderDecoder` (encoder_decoder.py)."""

    name: str = ""                      # "decoder-only" | "encoder-decoder" (as `KVSpec.family` says)
    peft_task_type: str = ""            # PEFT's task_type for an exported prefix-tuning adapter
    peft_submodules: int = 1            # PEFT's num_transformer_submodules
    auto_class: str = "causal"          # which transformers Auto class loads it: "causal" | "seq2seq"
    unsupported: frozenset = frozenset()  # FEATURES this family lacks

    def supports(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise KeyError(f"unknown feature {feature!r}")
        return feature not in self.unsupported

    def require(self, feature: str, model=None, hint: str = "") -> None:
        """A ValueError naming the feature and the family when the family lacks it."""
        if not self.supports(feature):
            article = "an" if self.name[0] in "aeiou" else "a"
            what = f"{type(model).__name__} is {article} {self.name} model" if model is not None else \
                f"the model is {self.name}"
            raise ValueError(f"{FEATURES[feature]} is not supported on {self.name} models ({what})"
                             + (f"; {hint}" if hint else ""))

    # each family implements these (see the two subclasses for the conventions)
    def build_cache(self, model, kv, batch_size: int):
        raise NotImplementedError

    def text_kv(self, model, ids: list[int]):
        raise NotImplementedError

    def embeds_kv(self, model, embeds):
        """The frozen model's K/V of input embeddings (a 'prompt' prefix; only where `prompt_prefix` is supported)."""
        raise NotImplementedError

    def sft_logits(self, model, batch: dict, prefix):
        raise NotImplementedError

    def score_completions(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix=None, **kw):
        raise NotImplementedError

    def sample(self, model, tokenizer, prompt_ids, prompt_mask, prefix=None, **kw):
        raise NotImplementedError

    def generate_inputs(self, model, input_ids, attention_mask, length: int, fill: int) -> dict:
        """transformers `generate`'s inputs (all but the cache) for prompts under a cached prefix of `length`."""
        raise NotImplementedError

    def decoder_start_id(self, model) -> int | None:
        """The token a supervised example's decoder input starts with (None: the text is its own input)."""
        return None

    def __repr__(self) -> str:
        return f"<{self.name} family>"


# ---- transformers' cache argument ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cache_keyword(forward_type) -> str:
    params = inspect.signature(forward_type).parameters  # follows a decorator's __wrapped__
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.24), else `past_key_values`."""
    return _cache_keyword(type(model).forward)


def call(model, cache, **inputs):
    """`model(**inputs)` with `cache` under the keyword the model's forward takes."""
    return model(**inputs, **{cache_keyword(model): cache})


def output_cache(out):
    """The cache a forward returned (`out.cache` where outputs have that field, else `out.past_key_values`)."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


# ---- the prefix's K/V --------------------------------------------------------------------------------------------
def check_family(spec: KVSpec, model, what: str = "the prefix") -> None:
    """A clear error for a decoder-only model's prefix on an encoder-decoder model, and the other way round."""
    have = kv_spec(model)
    if spec.encoder_decoder != have.encoder_decoder:
        raise ModelMismatchError(f"{what} was made for a {spec.family} model [{spec.describe()}] but the model is "
                                 f"{have.family} [{have.describe()}]; a prefix only fits the family it was made for")


def prefix_kv(model, prefix, input_ids: torch.Tensor | None = None,
              route_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The prefix's K/V, or None for "no prefix" (a None prefix or a zero-length one). An input-conditioned
    prefix (kind dynamic) gives per-row K/V [rows, layers, 2, P, kv_dim] for `input_ids`, routed on the tokens
    where `route_mask` is 1. A K/V tensor [layers, 2, P, kv_dim] is its own K/V."""
    if isinstance(prefix, torch.Tensor):
        return prefix if prefix.shape[-2] else None
    if prefix is None or prefix.length == 0:
        return None
    if getattr(prefix, "spec", None) is not None:
        check_family(prefix.spec, model)
    if getattr(prefix, "input_conditioned", False):
        return prefix.key_values(model, input_ids, route_mask)
    return prefix.key_values(model)
