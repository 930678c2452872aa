"""rlprefix: steer a frozen language model (decoder-only or encoder-decoder) with learned K/V prefixes; warm start,
RL (PPO and critic-free estimators) against reward callables, compression and export. The public API; the package map
is in the README."""
import warnings

from rlprefix.decoding.bank import PrefixBank
from rlprefix.decoding.engine import generate
from rlprefix.decoding.plain_generate import generate_kwargs
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.distributed.groups import DistributedConfig
from rlprefix.files import ArtifactError
from rlprefix.models.adapter import family_of, reference_sample
from rlprefix.models.loading import DEFAULT_MODEL, load_model
from rlprefix.models.spec import KVSpec, ModelMismatchError, kv_spec
from rlprefix.prefixes.artifacts import load_prefix, save_prefix
from rlprefix.prefixes.dynamic import DynamicPrefix
from rlprefix.prefixes.lowrank import CompressedPrefix, compress
from rlprefix.prefixes.peft import export_peft
from rlprefix.prefixes.prefix import Prefix
from rlprefix.train.compress import compress_to_budget, fidelity_report
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.train.ppo import PPOConfig, PPOResult, ppo
from rlprefix.train.warm_start import WarmStartConfig, WarmStartResult, warm_start
from rlprefix.version import __version__

__all__ = ["__version__", "DEFAULT_MODEL", "KVSpec", "kv_spec", "load_model", "family_of", "DistributedConfig",
           "Prefix", "DynamicPrefix", "ArtifactError", "ModelMismatchError", "load_prefix", "save_prefix", "generate",
           "PrefixBank", "generate_kwargs", "reference_sample", "encode_prompts", "WarmStartConfig", "WarmStartResult",
           "warm_start", "PPOConfig", "PPOResult", "ppo", "CompressedPrefix", "compress", "compress_to_budget",
           "fidelity_report", "export_peft", "evaluate_reward"]

# names that changed, kept importable: old name -> (new object, what to use instead)
_DEPRECATED = {
    "sample": (reference_sample, "rlprefix.reference_sample (the reference decode loop; rlprefix.generate and "
                                 "rlprefix.decoding.engine.sample are the fast path)"),
}


def __getattr__(name):
    if name in _DEPRECATED:
        obj, instead = _DEPRECATED[name]
        warnings.warn(f"rlprefix.{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=2)
        return obj
    raise AttributeError(f"module 'rlprefix' has no attribute {name!r}")
