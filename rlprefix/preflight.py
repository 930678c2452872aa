"""Checks that need no model: run them before loading one, so a bad input fails in a second, not a minute."""
from __future__ import annotations

from pathlib import Path

from rewards import REGISTRY, build_reward, load_callable

from rlprefix.settings import ConfigError
from rlprefix.config import RunConfig
from rlprefix.train.data import DATA_SUFFIXES, load_records
from rlprefix.train.general_text import load_passages


def check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")


def _is_local(source) -> bool:
    """A local file or directory, or a file that should be (a data file's suffix): checked here, not on the hub."""
    path = Path(str(source))
    return path.exists() or path.suffix in DATA_SUFFIXES


def check_dataset(source, key: str, columns: list[list[str]]) -> None:
    """A local data file/dir exists, is readable, not empty, and has one of the `columns` sets."""
    if source is None or not _is_local(source):
        return  # a hub dataset: checked when it is loaded
    try:
        ds = load_records(source)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if not any(set(c) <= set(ds.column_names) for c in columns):
        raise ConfigError(f"{key}: {source} needs column(s) {' or '.join(str(c) for c in columns)}; it has "
                          f"{ds.column_names}")


def check_data(cfg: RunConfig) -> None:
    sft = [["prompt", "completion"], ["messages"]]
    if cfg.warm_start.enabled:
        check_dataset(cfg.warm_start.data, "warm_start.data", sft)
        check_dataset(cfg.warm_start.eval_data, "warm_start.eval_data", sft)
        check_general_text(cfg)
    if cfg.ppo.enabled:
        check_dataset(cfg.ppo.prompts, "ppo.prompts", [["prompt"]])
    check_dataset(cfg.ppo.eval_prompts, "ppo.eval_prompts", [["prompt"]])
    if cfg.prefix.from_dir and not Path(cfg.prefix.from_dir).is_dir():
        raise ConfigError(f"prefix.from_dir: {cfg.prefix.from_dir} is not a directory")


def check_general_text(cfg: RunConfig) -> None:
    """warm_start.mix_data is readable, with passages, when it is used (mixing or the forgetting measure)."""
    ws = cfg.warm_start
    if ws.mix_data is None or (ws.mix_ratio == 0 and ws.forgetting_eval == 0):
        return
    try:
        load_passages(ws.mix_data)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"warm_start.mix_data: {e}") from None


def check_reward(spec: dict, key: str = "reward") -> None:
    """The reward (and every component) names a built-in or an importable callable."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise ConfigError(f"{key}: needs a 'name' (a built-in such as sentiment, or 'package.module:function')")
    if name == "composite":
        comps = spec.get("components")
        if not isinstance(comps, list) or not comps:
            raise ConfigError(f"{key}.components: a composite reward needs a list of components")
        for i, comp in enumerate(comps):
            check_reward(comp, f"{key}.components[{i}]")
        return
    if name in REGISTRY:
        return
    if ":" in name or "." in name:
        try:
            load_callable(name)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
        return
    try:
        build_reward(name)  # raises the did-you-mean error
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def preflight(cfg: RunConfig) -> None:
    check_output_dir(Path(cfg.output_dir))
    check_reward(cfg.reward)
    check_data(cfg)
