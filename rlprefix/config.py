"""Run configuration: one YAML file describes a whole run (model, prefix, warm start, PPO, reward,
compression, export). Typed dataclasses with defaults; unknown keys, wrong types and out-of-range values
are errors that name the key, the value and what is allowed. `key.sub=value` overrides from the CLI."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .modeling import DEFAULT_MODEL
from .rl import PPOConfig
from .warmstart import WarmStartConfig


class ConfigError(ValueError):
    """A config key, type or value is wrong; the message names the key."""


@dataclass
class ModelSection:
    name: str = DEFAULT_MODEL              # alias, hub id, local dir, or .gguf file
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"                   # auto | cpu | cuda | cuda:N


@dataclass
class PrefixSection:
    length: int = 10
    kind: Literal["mlp", "kv", "prompt"] = "mlp"   # the parameterisation trained in the warm start
    init: Literal["random", "text"] = "text"
    init_text: str = "Write a warm, friendly and positive reply."
    mlp_hidden: int = 512
    from_dir: str | None = None            # start from a saved prefix instead of initialising one


@dataclass
class WarmStartSection(WarmStartConfig):
    enabled: bool = True
    data: str | None = None                # JSONL/CSV/Parquet file, local dataset dir or hub name
    eval_data: str | None = None


@dataclass
class PPOSection(PPOConfig):
    enabled: bool = True
    prompts: str | None = None             # file/dir/hub name with a `prompt` column (+ reward columns)
    eval_prompts: str | None = None        # held-out prompts for before/after evaluation
    eval_samples_per_prompt: int = 2
    merge_prefix: bool = True              # RL trains plain K/V (an mlp prefix is merged first, outputs unchanged)


@dataclass
class CompressSection:
    enabled: bool = True
    scope: Literal["shared", "matrix", "whole"] = "matrix"
    anchor: bool = True                    # factorise only the change from the init text's K/V (when there is one)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"   # storage of the factors
    rank: int | None = None
    energy: float | None = None
    max_kl: float | None = 0.05            # with rank and energy unset: smallest rank with per-token KL <= max_kl
    eval_reward: bool = True               # measure reward retained on the eval prompts


@dataclass
class ExportSection:
    formats: list[str] = field(default_factory=lambda: ["rlprefix", "peft"])


@dataclass
class LoggingSection:
    tensorboard: bool = True
    samples: int = 6                        # sample completions shown in the summary
    progress: bool = True


@dataclass
class RunConfig:
    output_dir: str = "runs/quickstart"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    prefix: PrefixSection = field(default_factory=PrefixSection)
    reward: dict = field(default_factory=lambda: {"name": "sentiment"})
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    compress: CompressSection = field(default_factory=CompressSection)
    export: ExportSection = field(default_factory=ExportSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- range checks: key -> (predicate, what is allowed) ---------------------------------------------------
_POS, _NONNEG, _UNIT = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: 0 < v <= 1, "in (0, 1]")
RANGES: dict[str, tuple] = {
    "prefix.length": (lambda v: v >= 1, ">= 1"), "prefix.mlp_hidden": _POS,
    "warm_start.steps": _NONNEG, "warm_start.batch_size": _POS, "warm_start.grad_accum": _POS, "warm_start.lr": _POS,
    "warm_start.max_length": (lambda v: v >= 8, ">= 8"), "warm_start.eval_every": _POS,
    "warm_start.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"), "warm_start.max_grad_norm": _POS,
    "warm_start.warmup_steps": _NONNEG, "warm_start.checkpoint_every": _POS,
    "ppo.steps": _NONNEG, "ppo.batch_size": _POS, "ppo.minibatch_size": _POS, "ppo.epochs": _POS, "ppo.lr": _POS,
    "ppo.value_lr": _POS, "ppo.max_new_tokens": _POS, "ppo.temperature": _POS, "ppo.top_p": _UNIT,
    "ppo.gamma": _UNIT, "ppo.lam": (lambda v: 0 <= v <= 1, "in [0, 1]"), "ppo.clip_range": _POS,
    "ppo.clip_range_value": _POS, "ppo.vf_coef": _NONNEG, "ppo.ent_coef": _NONNEG, "ppo.kl_coef": _NONNEG,
    "ppo.kl_target": _POS, "ppo.kl_horizon": _POS, "ppo.max_grad_norm": _POS, "ppo.target_kl_stop": _POS,
    "ppo.eval_samples_per_prompt": _POS, "ppo.checkpoint_every": _POS, "ppo.top_k": _NONNEG, "ppo.group_size": _POS,
    "compress.rank": (lambda v: v >= 1, ">= 1"), "compress.energy": _UNIT, "compress.max_kl": _POS,
}
_CHOICES = {"warm_start.precision": ("fp32", "bf16"), "warm_start.decay": ("cosine", "linear", "constant"),
            "ppo.reference": ("base", "initial"),
            "ppo.advantage": ("rloo", "grpo", "gae"), "ppo.kl_penalty": ("loss", "reward"), "ppo.on_reward_error": ("raise", "penalty")}
_EXPORTS = ("rlprefix", "peft")


def _type_ok(value: Any, tp) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float) a value against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, (list, tuple)) else value
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), (
            float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (allowed here: {', '.join(sorted(fields))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{full}: {value!r} is not {_type_name(tp)}")
        if isinstance(coerced, float) and not math.isfinite(coerced):
            raise ConfigError(f"{full}: {coerced!r} is not a finite number")
        if full in RANGES and coerced is not None:
            pred, allowed = RANGES[full]
            if not pred(coerced):
                raise ConfigError(f"{full}: {coerced!r} is out of range (must be {allowed})")
        if full in _CHOICES and coerced not in _CHOICES[full]:
            raise ConfigError(f"{full}: {coerced!r} is not one of {', '.join(_CHOICES[full])}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _cross_checks(cfg: RunConfig) -> None:
    if cfg.ppo.enabled:
        try:
            cfg.ppo.validate()  # the stage's own checks, reported as config errors
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.warm_start.enabled and not cfg.warm_start.data:
        raise ConfigError("warm_start.data: required when warm_start.enabled is true (a JSONL/CSV/Parquet file "
                          "with prompt/completion columns)")
    if cfg.ppo.enabled and not cfg.ppo.prompts:
        raise ConfigError("ppo.prompts: required when ppo.enabled is true (a file with a 'prompt' column)")
    if not isinstance(cfg.reward, dict) or "name" not in cfg.reward:
        raise ConfigError(f"reward: needs a 'name' (a built-in such as sentiment, or 'package.module:function'); "
                          f"got {cfg.reward!r}")
    bad = [f for f in cfg.export.formats if f not in _EXPORTS]
    if bad:
        raise ConfigError(f"export.formats: {bad} not allowed (choose from {', '.join(_EXPORTS)})")
    if cfg.compress.rank is not None and cfg.compress.energy is not None:
        raise ConfigError("compress: set rank or energy, not both")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1}); each key may "
                                  f"appear once per section")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_value(text: str) -> Any:
    """CLI override values are YAML scalars: 50, 0.1, true, null, [a, b], {name: x}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, text = item.partition("=")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(text)
    return raw


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None,
                base_dir: str | Path | None = None) -> RunConfig:
    """Read YAML (or a dict), apply overrides, validate. Relative data paths resolve against the config file."""
    if isinstance(source, dict) or source is None:
        raw = dict(source or {})
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"config {path} is not a file")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        base_dir = base_dir or path.parent
    raw = apply_overrides(raw, list(overrides or []))
    cfg = _build(RunConfig, raw, "")
    _cross_checks(cfg)
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Data paths given relative to the config file work from any working directory."""
    for section, key in (("warm_start", "data"), ("warm_start", "eval_data"), ("ppo", "prompts"),
                         ("ppo", "eval_prompts"), ("prefix", "from_dir")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                setattr(obj, key, str(candidate.resolve()))


def stage_config(section, cls):
    """The stage's own config (WarmStartConfig / PPOConfig) from its config section."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(section).items() if k in names})


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
