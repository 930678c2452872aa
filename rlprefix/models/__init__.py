"""Models: loading (`loading`), what a prefix must match (`spec`), the family adapter (`family`, `adapter`,
`decoder_only`, `encoder_decoder`) and the sampling maths both families use (`sampling`)."""
from rlprefix.models.adapter import build_cache, family_of, reference_sample, score_completions, sft_logits, text_kv
from rlprefix.models.spec import is_encoder_decoder
from rlprefix.models.family import ModelFamily, prefix_kv
from rlprefix.models.loading import DEFAULT_MODEL, load_model
from rlprefix.models.sampling import Rollout
from rlprefix.models.spec import KVSpec, ModelMismatchError, kv_spec, resolve_dtype

__all__ = ["build_cache", "family_of", "is_encoder_decoder", "reference_sample", "score_completions", "sft_logits",
           "text_kv", "ModelFamily", "prefix_kv", "DEFAULT_MODEL", "load_model", "Rollout", "KVSpec",
           "ModelMismatchError", "kv_spec", "resolve_dtype"]
