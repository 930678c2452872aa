"""rlprefix: steer a frozen causal LM with learned KV prefixes; warm start, PPO, compress, export."""
__version__ = "0.1.0"

from .modeling import DEFAULT_MODEL, KVSpec, kv_spec, load_model  # noqa: E402
from .prefix import Prefix  # noqa: E402
from .io import ArtifactError, ModelMismatchError, load_prefix, save_prefix  # noqa: E402
from .generation import generate, sample, encode_prompts  # noqa: E402

__all__ = ["__version__", "DEFAULT_MODEL", "KVSpec", "kv_spec", "load_model", "Prefix", "ArtifactError",
           "ModelMismatchError", "load_prefix", "save_prefix", "generate", "sample", "encode_prompts"]
