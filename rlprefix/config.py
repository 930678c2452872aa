"""Run configuration: one YAML file describes a whole run (model, prefix, warm start, PPO, reward,
compression, export). Typed dataclasses with defaults; unknown keys, wrong types and out-of-range values
are errors that name the key, the value and what is allowed. `key.sub=value` overrides from the CLI."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from rlprefix.distributed.groups import DistributedConfig
from rlprefix.models.loading import DEFAULT_MODEL
from rlprefix.prefixes.dynamic import REFUSALS
from rlprefix.prefixes.lowrank import CompressConfig
from rlprefix.settings import NONNEG, POSITIVE, UNIT, Check, ConfigError, Settings, at_least, describe, each_of, setting, type_hints
from rlprefix.train.ppo import PPOConfig
from rlprefix.train.warm_start import WarmStartConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "apply_overrides", "parse_value", "stage_config",
           "dump_config", "reference", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("rlprefix", "peft")  # what a run can export (export.formats) and `rlprefix export --format`


@dataclass
class ModelSection(Settings):
    section = "model"
    name: str = setting(DEFAULT_MODEL, "alias, hub id, local dir, or .gguf file")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "weights of the frozen model")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")


@dataclass
class PrefixSection(Settings):
    section = "prefix"
    length: int = setting(10, "virtual tokens", at_least(1))
    kind: Literal["mlp", "kv", "prompt", "shared", "dynamic", "image"] = setting(
        "mlp", "the parameterisation trained in the warm start (dynamic: input-conditioned, a bank mixed per prompt; "
        "image: computed from each row's image, the data being image-caption specs; neither compresses nor exports "
        "to PEFT)")
    init: Literal["random", "text"] = setting("text", "start from init_text's K/V or at random")
    init_text: str = setting("Write a warm, friendly and positive reply.", "text whose K/V start the prefix")
    mlp_hidden: int = setting(512, "hidden width of the mlp parameterisation (and of an image prefix's mapper)",
                              POSITIVE)
    shared_dim: int | None = setting(None, "width d of the shared matrix [length, d] of kind shared (null: "
                                     "ceil(length / 4))", at_least(1))
    bank_size: int = setting(4, "prefixes in the bank of kind dynamic (mixed per prompt by a router)", at_least(1))
    form: Literal["kv", "embedding"] = setting("kv", "kind image: kv (the mapper's coefficients over a learned K/V "
                                               "basis in every layer) or embedding (mapped input-embedding tokens)")
    encoder: str | None = setting(None, "kind image: the frozen image encoder, a transformers vision model (hub id "
                                  "or folder) or null: the embedded small CNN for the built-in data (not CLIP)")
    basis: int = setting(16, "kind image, form kv: K/V basis entries the mapper mixes", at_least(1))
    image_prompt: str = setting("Describe the image in a few words.", "kind image: the prompt paired with every "
                                "image of image-caption data")
    from_dir: str | None = setting(None, "start from a saved prefix instead of initialising one")


@dataclass
class WarmStartSection(WarmStartConfig):
    enabled: bool = setting(True, "run this stage")
    data: str | None = setting(None, "JSONL/CSV/Parquet file, local dataset dir or hub name (prompt/completion); "
                               "kind image: builtin:shapes, builtin:digits or a JSONL of {image, caption}")
    eval_data: str | None = setting(None, "held-out prompt/completion pairs (default: eval_fraction of data)")


@dataclass
class PPOSection(PPOConfig):
    enabled: bool = setting(True, "run this stage")
    prompts: str | None = setting(None, "file/dir/hub name with a `prompt` column (+ reward columns)")
    eval_prompts: str | None = setting(None, "held-out prompts for before/after evaluation (default: prompts)")
    eval_samples_per_prompt: int = setting(2, "completions per held-out prompt", POSITIVE)
    merge_prefix: bool = setting(True, "RL trains plain K/V (an mlp prefix is merged first, outputs unchanged)")


@dataclass
class CompressSection(CompressConfig):
    """Stage 3: scope, anchor and dtype (and their defaults) are CompressConfig's, shared with compress() and
    `rlprefix compress`."""
    enabled: bool = setting(True, "run this stage")
    rank: int | None = setting(None, "fixed rank", at_least(1))
    energy: float | None = setting(None, "smallest rank keeping this fraction of spectral energy", UNIT)
    max_kl: float | None = setting(0.05, "with rank and energy unset: smallest rank with per-token KL <= max_kl",
                                   POSITIVE)
    eval_reward: bool = setting(True, "measure reward retained on the eval prompts")

    def check_fields_together(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise ConfigError("compress: set rank or energy, not both")


@dataclass
class ExportSection(Settings):
    section = "export"
    formats: list[str] = setting(help="artifacts written at the end", check=each_of(*EXPORT_FORMATS),
                                 default_factory=lambda: list(EXPORT_FORMATS))


@dataclass
class LoggingSection(Settings):
    section = "logging"
    tensorboard: bool = setting(True, "also write TensorBoard event files (when tensorboard is installed)")
    samples: int = setting(6, "sample completions shown in the summary", NONNEG)
    progress: bool = setting(True, "progress bars (false turns every stage's bar off)")


@dataclass
class RunConfig(Settings):
    output_dir: str = setting("runs/quickstart", "where every stage writes (rerunning resumes)")
    seed: int = setting(0, "seed of the run (initialisation, evaluation)")
    model: ModelSection = setting(help="the frozen model", default_factory=ModelSection)
    prefix: PrefixSection = setting(help="the prefix trained", default_factory=PrefixSection)
    reward: dict = setting(help="{name: ..., options}: a built-in, composite, or package.module:function",
                           check=Check(lambda v: "name" in v, "a mapping with a name", "needs a 'name' (a built-in "
                                       "such as sentiment, or 'package.module:function')"),
                           default_factory=lambda: {"name": "sentiment"})
    warm_start: WarmStartSection = setting(help="stage 1: supervised warm start",
                                           default_factory=WarmStartSection)
    ppo: PPOSection = setting(help="stage 2: RL", default_factory=PPOSection)
    compress: CompressSection = setting(help="stage 3: low-rank compression", default_factory=CompressSection)
    export: ExportSection = setting(help="what is written at the end", default_factory=ExportSection)
    logging: LoggingSection = setting(help="metrics and progress", default_factory=LoggingSection)
    distributed: DistributedConfig = setting(help="several processes (accelerate launch): how they hold the "
                                             "frozen model", default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def reference() -> str:
    """Every section and key with its default, help and allowed values (`rlprefix run --help`)."""
    return "\n".join(describe(RunConfig))


def _build(cls, data: Any, path: str):
    """A section from its YAML mapping: unknown keys are errors with a suggestion; the dataclass checks values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} ({data!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (allowed here: {', '.join(sorted(fields))})")
        tp = type_hints(cls)[key]
        kwargs[key] = _build(tp, value, full) if dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)


def _cross_checks(cfg: RunConfig) -> None:
    """What a run needs beyond each section's own checks."""
    if cfg.warm_start.enabled and not cfg.warm_start.data:
        raise ConfigError("warm_start.data: required when warm_start.enabled is true (a JSONL/CSV/Parquet file "
                          "with prompt/completion columns)")
    if cfg.prefix.kind in ("dynamic", "image"):  # input-conditioned: no single K/V to keep, compress or put in PEFT
        if cfg.compress.enabled:
            raise ConfigError(f"compress.enabled: {REFUSALS['compress']}")
        if "peft" in cfg.export.formats:
            raise ConfigError(f"export.formats: {REFUSALS['peft']}")
    if cfg.ppo.enabled and not cfg.ppo.prompts:
        raise ConfigError("ppo.prompts: required when ppo.enabled is true (a file with a 'prompt' column)")


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
    for section, key in (("warm_start", "data"), ("warm_start", "eval_data"), ("warm_start", "mix_data"),
                         ("ppo", "prompts"), ("ppo", "eval_prompts"), ("prefix", "from_dir")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and value != "builtin" and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                setattr(obj, key, str(candidate.resolve()))


def stage_config(section, cls):
    """The stage's own config (WarmStartConfig / PPOConfig) from its config section."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(section).items() if k in names})


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
