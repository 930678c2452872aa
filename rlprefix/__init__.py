"""rlprefix: steer a frozen causal LM with learned KV prefixes; warm start, PPO, compress, export."""
from .version import __version__  # noqa: E402,F401

from .modeling import DEFAULT_MODEL, KVSpec, kv_spec, load_model  # noqa: E402
from .distributed import DistributedConfig  # noqa: E402
from .prefix import Prefix  # noqa: E402
from .dynamic_prefix import DynamicPrefix  # noqa: E402
from .io import ArtifactError  # noqa: E402
from .artifacts import ModelMismatchError, load_prefix, save_prefix  # noqa: E402
from .generation import encode_prompts, sample  # noqa: E402
from .engine import PrefixBank, generate  # noqa: E402
from .stages.warm_start import WarmStartConfig, WarmStartResult, warm_start  # noqa: E402
from .stages.ppo import PPOConfig, PPOResult, ppo  # noqa: E402
from .lowrank import CompressedPrefix, compress  # noqa: E402
from .stages.compress import compress_to_budget, fidelity_report  # noqa: E402
from .peft_export import export_peft  # noqa: E402
from .evaluate import evaluate_reward  # noqa: E402

__all__ = ["__version__", "DEFAULT_MODEL", "KVSpec", "kv_spec", "load_model", "DistributedConfig", "Prefix", "DynamicPrefix",
           "ArtifactError",
           "ModelMismatchError", "load_prefix", "save_prefix", "generate", "PrefixBank", "sample", "encode_prompts",
           "WarmStartConfig", "WarmStartResult", "warm_start", "PPOConfig", "PPOResult", "ppo", "CompressedPrefix",
           "compress", "compress_to_budget", "fidelity_report", "export_peft", "evaluate_reward"]
