"""Checks that need no model: run them before loading one, so a bad input fails in a second, not a minute.

Also the layout of a run's output directory: every path `rlprefix run` writes there (`run_outputs`, named once: the
recipe writes by these names), and which of those already hold something rlprefix did not write (`unowned_outputs`),
so a run never replaces a user's file unless told to (`--overwrite`).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

from rewards import REGISTRY, build_reward, load_callable

from rlprefix.settings import ConfigError
from rlprefix.config import RunConfig
from rlprefix.files import ArtifactError, read_json, replaceable_artifact_dir
from rlprefix.freshness import MARKERS_DIR, PPO_DIR, RESUME_KEY_FILE, WARM_START_DIR
from rlprefix.lock import LOCK_FILE
from rlprefix.summary import SUMMARY_JSON, SUMMARY_MD, is_own_summary
from rlprefix.images import load_image_captions
from rlprefix.train.data import DATA_SUFFIXES, JSON_SUFFIXES, check_records_file, load_records
from rlprefix.train.general_text import load_passages, source_path
from rlprefix.train.stage_run import PPO_FILES, WARM_START_FILES, StageFiles


def check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")


def _is_local(source) -> bool:
    """A local file or directory, or a file that should be (a data file's suffix): checked here, not on the hub."""
    path = Path(str(source))
    return path.exists() or path.suffix in DATA_SUFFIXES


def check_dataset(source, key: str, columns: list[list[str]]) -> None:
    """A local data file/dir exists, is readable, not empty, and has one of the `columns` sets (a JSON file: every
    record, by line)."""
    if source is None or not _is_local(source):
        return  # a hub dataset: checked when it is loaded
    try:
        if Path(str(source)).suffix in JSON_SUFFIXES and Path(str(source)).is_file():
            check_records_file(source, columns)
        ds = load_records(source)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if not any(set(c) <= set(ds.column_names) for c in columns):
        raise ConfigError(f"{key}: {source} needs column(s) {' or '.join(str(c) for c in columns)}; it has "
                          f"{ds.column_names}")


def check_image_data(cfg: RunConfig) -> None:
    """An image prefix's data: image-caption specs that load (built-in names, a JSONL of {image, caption})."""
    sources = {"warm_start.data": cfg.warm_start.data if cfg.warm_start.enabled else None,
               "warm_start.eval_data": cfg.warm_start.eval_data if cfg.warm_start.enabled else None,
               "ppo.prompts": cfg.ppo.prompts if cfg.ppo.enabled else None, "ppo.eval_prompts": cfg.ppo.eval_prompts}
    for key, spec in sources.items():
        try:
            if spec is not None:
                load_image_captions(spec)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{key}: {e} (prefix.kind image reads image-caption data: builtin:shapes, "
                              f"builtin:digits or a JSONL of {{image, caption}})") from None


def check_data(cfg: RunConfig) -> None:
    sft = [["prompt", "completion"], ["messages"]]
    if cfg.prefix.kind == "image":
        check_image_data(cfg)
    elif cfg.warm_start.enabled:
        check_dataset(cfg.warm_start.data, "warm_start.data", sft)
        check_dataset(cfg.warm_start.eval_data, "warm_start.eval_data", sft)
        check_general_text(cfg)
    if cfg.prefix.kind != "image":
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
        if source_path(ws.mix_data).suffix in JSON_SUFFIXES and source_path(ws.mix_data).is_file():
            check_records_file(source_path(ws.mix_data), [["text"]])
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


def preflight(cfg: RunConfig, overwrite: bool = False) -> None:
    """Every check of a run's inputs; and, unless `overwrite`, that it replaces no file rlprefix did not write."""
    check_output_dir(Path(cfg.output_dir))
    if not overwrite:
        check_run_outputs(cfg)
    check_reward(cfg.reward)
    check_data(cfg)


# ---- the output directory: what a run writes there, and whose files are there already -----------------------------
CONFIG_FILE, CONFIG_FALLBACK = "config.yaml", "config.rlprefix.yaml"
CONFIG_HEADER = "# written by `rlprefix run`: the configuration of the run in this directory\n"
PREFIX_DIRS = {"warm_start": "prefix_warmstart", "ppo": "prefix_ppo", "compress": "prefix_compressed"}
EXPORT_DIRS = {"rlprefix": "export_rlprefix", "peft": "export_peft"}
COMPRESSION_REPORT = "compression_report.json"
# the finished-stage markers (OUTPUT_DIR/stages/NAME.json), one per name of freshness.stage_keys but "prefix"
MARKER_NAMES = ("eval_base", "warm_start", "eval_warm_start", "ppo", "eval_after", "compress")


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _own_config(path: Path) -> bool:
    return path.is_file() and _head(path, len(CONFIG_HEADER.encode())) == CONFIG_HEADER.encode()


def _own_json(*keys: str) -> Callable[[Path], bool]:
    """A JSON object holding `keys` (a stage marker, a resume record, the compression report)."""
    def own(path: Path) -> bool:
        try:
            return path.is_file() and set(keys) <= set(read_json(path))
        except ArtifactError:
            return False
    return own


def _own_metrics(path: Path) -> bool:
    """A metrics file: empty, or JSON Lines starting with a record of a step (train.metrics.MetricLogger)."""
    if not path.is_file():
        return False
    first = next((line for line in _head(path, 1 << 16).split(b"\n") if line.strip()), None)
    try:
        record = json.loads(first) if first is not None else {"step": None}
    except ValueError:
        return False
    return isinstance(record, dict) and "step" in record


def _own_curves(path: Path) -> bool:
    """A PNG that matplotlib drew (train.metrics.plot_metrics): its Software text chunk names it."""
    head = _head(path, 512) if path.is_file() else b""
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head


def _own_lock(path: Path) -> bool:
    """The lock file (rlprefix.lock): empty, or the pid of its last holder."""
    return path.is_file() and re.fullmatch(rb"\d*\s*", _head(path, 65)) is not None


def _stage_outputs(stage_dir: str, files: StageFiles) -> list[tuple[str, Callable[[Path], bool]]]:
    """A training stage's directory and the files it writes there (the names of earlier releases too, which the
    stage renames to the current ones). TensorBoard's event files are left out: each has a new, unique name."""
    named = [files] + ([StageFiles(*files.legacy)] if files.legacy else [])
    paths = [(stage_dir, Path.is_dir), (f"{stage_dir}/{RESUME_KEY_FILE}", _own_json("parts"))]
    for f in named:
        paths += [(f"{stage_dir}/{f.checkpoint}", replaceable_artifact_dir), (f"{stage_dir}/{f.metrics}", _own_metrics),
                  (f"{stage_dir}/{f.curves}", _own_curves)]
    return list(dict(paths).items())


def config_target(out: Path) -> Path:
    """Where the run's config goes: config.yaml, unless the user keeps one of their own there (then
    config.rlprefix.yaml; their config.yaml is never replaced)."""
    path = out / CONFIG_FILE
    return out / CONFIG_FALLBACK if (path.exists() or path.is_symlink()) and not _own_config(path) else path


def run_outputs(cfg: RunConfig) -> list[tuple[Path, Callable[[Path], bool]]]:
    """Every path `rlprefix run` of `cfg` writes in its output_dir, in the order it writes them, each with the test
    that what is there already is rlprefix's (a previous run's, which the run may replace or resume from)."""
    out = Path(cfg.output_dir)
    paths = [(LOCK_FILE, _own_lock), (config_target(out).name, _own_config), (MARKERS_DIR, Path.is_dir)]
    paths += [(f"{MARKERS_DIR}/{name}.json", _own_json("key")) for name in MARKER_NAMES]
    for stage, stage_dir, files in (("warm_start", WARM_START_DIR, WARM_START_FILES), ("ppo", PPO_DIR, PPO_FILES)):
        if getattr(cfg, stage).enabled:
            paths += _stage_outputs(stage_dir, files) + [(PREFIX_DIRS[stage], replaceable_artifact_dir)]
    if cfg.compress.enabled:
        paths += [(PREFIX_DIRS["compress"], replaceable_artifact_dir),
                  (COMPRESSION_REPORT, _own_json("ranks", "compression_ratio"))]
    exports = [f for f in cfg.export.formats if not (f == "rlprefix" and cfg.compress.enabled)]
    paths += [(EXPORT_DIRS[f], replaceable_artifact_dir) for f in exports]
    paths += [(SUMMARY_JSON, is_own_summary), (SUMMARY_MD, is_own_summary)]
    return [(out / rel, own) for rel, own in paths]


def unowned_outputs(cfg: RunConfig) -> list[Path]:
    """The paths the run writes that already hold something rlprefix did not write (a user's file or folder)."""
    return [p for p, own in run_outputs(cfg) if (p.exists() or p.is_symlink()) and not own(p)]


def check_run_outputs(cfg: RunConfig) -> None:
    """Refuse a run that would replace something rlprefix did not write, naming the first such path."""
    found = unowned_outputs(cfg)
    if found:
        first, more = found[0], f" (and {len(found) - 1} more such path(s))" if len(found) > 1 else ""
        what = "holds files" if first.is_dir() else "is a file"
        raise ConfigError(f"output_dir: {first} {what} that rlprefix did not write; refusing to replace it{more}. "
                          f"`rlprefix run --overwrite` replaces it, or choose another output_dir")


def remove_unowned(cfg: RunConfig, log) -> None:
    """`--overwrite`: remove what the run would replace that rlprefix did not write (not the lock, held by now)."""
    for path in unowned_outputs(cfg):
        if path.name == LOCK_FILE:
            continue
        log(f"--overwrite: removing {path} (not written by rlprefix)")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
