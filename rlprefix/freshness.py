"""Never trust a stale result. This module decides when `rlprefix run` (and `rlprefix sweep`) may reuse what an
earlier run left in the output directory:

- a finished stage is skipped when its marker (OUTPUT_DIR/stages/NAME.json) holds the stage's key (`stage_keys`):
  the settings and data content its result depends on, chained through the stages before it;
- an unfinished stage's checkpoint is resumed only when the settings it depends on are those it was written with
  (`check_checkpoints`); which settings those are is the stage's own rule -- everything but `NOT_IN_HASH` and the
  stage's list (`NOT_IN_WARM_START_HASH`, `NOT_IN_PPO_HASH`) -- read here, not restated (`warm_start_parts`,
  `ppo_parts`). The stage's own `config_hash` check stays the last word; these name what changed first;
- a sweep length's checkpoint is kept under the same rule for the warm start (`sweep_keys`).

Every key is `rlprefix.files.json_hash`. Where a stage writes inside OUTPUT_DIR is named here once (`*_DIR`, and
the stages' own file names in `rlprefix.train.stage_run`).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from rlprefix.files import atomic_write_json, json_hash, read_json
from rlprefix.settings import ConfigError
from rlprefix.train.checkpoint import checkpoint_step
from rlprefix.train.general_text import BUILTIN, source_path
from rlprefix.train.ppo import NOT_IN_PPO_HASH, learning_rate
from rlprefix.train.stage_run import NOT_IN_HASH, PPO_FILES, WARM_START_FILES
from rlprefix.train.warm_start import NOT_IN_WARM_START_HASH

RESUME_KEY_FILE = "resume_key.json"
# Where `rlprefix run` writes inside OUTPUT_DIR: each training stage's directory (the stage names its files in it:
# WARM_START_FILES, PPO_FILES) and the finished-stage markers.
WARM_START_DIR, PPO_DIR, MARKERS_DIR = "warm_start", "ppo", "stages"


def warm_start_checkpoint(out: Path) -> Path:
    WARM_START_FILES.migrate(Path(out) / WARM_START_DIR)
    return Path(out) / WARM_START_DIR / WARM_START_FILES.checkpoint


def ppo_checkpoint(out: Path) -> Path:
    PPO_FILES.migrate(Path(out) / PPO_DIR)
    return Path(out) / PPO_DIR / PPO_FILES.checkpoint


def content_hash(source) -> str | None:
    """sha256 of a data file (or of every file under a directory); other sources (hub names) hash as their name."""
    if source is None:
        return None
    path = Path(str(source))
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return f"name:{source}"
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ---- finished stages: keys and markers ---------------------------------------------------------------------------
def stage_key(*parts) -> str:
    return json_hash(parts)


# Prefix settings that only one kind reads: in the stage key only for that kind, so keys of runs from before them
# (and of the other kinds) are kept.
_PREFIX_KIND_ONLY = {"bank_size": "dynamic", "form": "image", "encoder": "image", "basis": "image",
                     "image_prompt": "image"}


def _prefix_fields(section) -> dict:
    """The prefix section as a stage key; shared_dim only when set, and each kind's own settings only for it."""
    return {k: v for k, v in asdict(section).items() if not (k == "shared_dim" and v is None)
            and not (k in _PREFIX_KIND_ONLY and section.kind != _PREFIX_KIND_ONLY[k])}


def _ppo_fields(cfg) -> dict:
    """The ppo section as a stage key, with `lr: null` as the learning rate it means for the configured prefix kind
    (so a run from before the kinds' rates, which wrote 0.01, keeps its key)."""
    return {**asdict(cfg.ppo), "lr": learning_rate(cfg.ppo, cfg.prefix)}


def config_key(cfg) -> str:
    """The whole config's hash, as artifact manifests record it (provenance): the image prefix's settings only for
    kind image, so a config from before them hashes as it did; ppo.lr as it resolves (_ppo_fields)."""
    image_only = {k for k, kind in _PREFIX_KIND_ONLY.items() if kind == "image"}  # added after bank_size
    whole = cfg.to_dict()
    prefix = {k: v for k, v in whole["prefix"].items() if cfg.prefix.kind == "image" or k not in image_only}
    return stage_key({**whole, "prefix": prefix, "ppo": {**whole["ppo"], "lr": learning_rate(cfg.ppo, cfg.prefix)}})


# Warm-start settings added after runs existed, with the value that means "as before": left out of the stage keys
# at that value, so the keys of earlier runs hold (as for prefix.shared_dim).
_WS_LATER = {"mix_data": "builtin", "mix_ratio": 0.0, "forgetting_eval": 32}


def _warm_start_fields(section) -> dict:
    """The warm_start section as a stage key; the later settings only where they differ from "as before"."""
    return {k: v for k, v in asdict(section).items() if not (k in _WS_LATER and v == _WS_LATER[k])}


def warm_start_data(ws) -> dict:
    """The content hashes of the warm start's data: ws_data, ws_eval, and ws_mix (a general-text file of the user's;
    None for the built-in sample or none)."""
    mix = ws.mix_data
    return {"ws_data": content_hash(ws.data), "ws_eval": content_hash(ws.eval_data),
            "ws_mix": content_hash(source_path(mix)) if mix is not None and mix != BUILTIN else None}


def stage_keys(cfg, eval_kw: dict) -> dict:
    """Each stage's key: the settings and data content its result depends on, chained through the stages
    before it, so a change reruns that stage and every one after it. "data": each data source's content hash."""
    eval_prompts = cfg.ppo.eval_prompts or cfg.ppo.prompts
    data = {**warm_start_data(cfg.warm_start), "prompts": content_hash(cfg.ppo.prompts)}
    eval_hash = data["prompts"] if eval_prompts == cfg.ppo.prompts else content_hash(eval_prompts)
    prefix = stage_key(_prefix_fields(cfg.prefix), cfg.model.name, cfg.seed, content_hash(cfg.prefix.from_dir))
    ws = stage_key(prefix, _warm_start_fields(cfg.warm_start), data["ws_data"], data["ws_eval"],
                   *([data["ws_mix"]] if data["ws_mix"] else []))
    ppo = stage_key(ws if cfg.warm_start.enabled else prefix, _ppo_fields(cfg), cfg.reward, data["prompts"])
    base = stage_key(cfg.model.name, cfg.reward, eval_prompts, eval_kw, eval_hash, cfg.ppo.on_reward_error,
                     cfg.ppo.reward_penalty)
    after = stage_key(ppo, cfg.ppo.enabled, ws, cfg.warm_start.enabled, base)
    return {"data": data, "prefix": prefix, "warm_start": ws, "ppo": ppo, "eval_base": base,
            "eval_warm_start": stage_key(ws, base), "eval_after": after,
            "compress": stage_key(after, asdict(cfg.compress))}


class Stages:
    """Markers of finished stages (JSON), keyed to the part of the config each stage depends on."""

    def __init__(self, out: Path, dist):
        self.dir, self.dist = Path(out) / MARKERS_DIR, dist

    def done(self, name: str, key: str) -> dict | None:
        path = self.dir / f"{name}.json"
        if not path.exists():
            return None
        marker = read_json(path)
        return marker if marker.get("key") == key else None

    def finish(self, name: str, key: str, info: dict) -> dict:
        marker = {"key": key, **info}
        if self.dist.is_main:
            atomic_write_json(self.dir / f"{name}.json", marker)
        self.dist.barrier()  # other processes may read what the main process wrote for this stage
        return marker


# ---- unfinished stages: may their checkpoints resume? -------------------------------------------------------------
# Section fields of `rlprefix run` that no stage checkpoint depends on, beyond what the stages' own hashes leave out:
# whether the stage runs, the data paths (their content is named instead) and the run's held-out evaluation.
RUN_ONLY = {"enabled", "data", "eval_data", "prompts", "eval_prompts", "eval_samples_per_prompt"}


def warm_start_parts(ws, data: dict, start: str | None = None) -> dict:
    """What a warm-start checkpoint depends on, by name: every setting its config_hash hashes (all but NOT_IN_HASH
    and NOT_IN_WARM_START_HASH), the data by content, what the general-text mixing draws from (the stage hashes the
    mixed examples themselves: the ratio, and when mixing, the source's content and the passages held out of it),
    and `start`, the starting prefix's key."""
    skip = set(NOT_IN_HASH) | set(NOT_IN_WARM_START_HASH) | RUN_ONLY
    parts = {f"warm_start.{k}": v for k, v in asdict(ws).items() if k not in skip}
    mixing = ws.mix_ratio > 0
    parts.update({"warm_start.data (content)": data["ws_data"], "warm_start.eval_data (content)": data["ws_eval"],
                  "warm_start.mix_ratio": ws.mix_ratio,
                  "warm_start.mix_data (content)": (data["ws_mix"] or ws.mix_data) if mixing else None,
                  "warm_start.forgetting_eval (held out of the mix)": ws.forgetting_eval if mixing else None})
    if start is not None:
        parts["starting prefix"] = start
    return parts


def ppo_parts(cfg, data: dict, start: str) -> dict:
    """What a PPO checkpoint depends on, by name: every setting its config_hash hashes (all but NOT_IN_HASH and
    NOT_IN_PPO_HASH), the reward, the prompts by content and `start`, the starting prefix's key."""
    skip = set(NOT_IN_HASH) | set(NOT_IN_PPO_HASH) | RUN_ONLY
    parts = {f"ppo.{k}": v for k, v in _ppo_fields(cfg).items() if k not in skip}
    parts.update({"reward": cfg.reward, "ppo.prompts (content)": data["prompts"],
                  "starting prefix (warm start)": start})
    return parts


def check_resume(stage_dir: Path, checkpoint: Path, parts: dict, steps: int, steps_key: str, stage: str) -> None:
    """Refuse to resume `checkpoint` when any of `parts` (name -> value) differs from the run that wrote it,
    or when it is already past `steps`; otherwise record `parts` as the ones this stage now runs with.

    Only parts both records name are compared: one that only one of them names was recorded by another version of
    rlprefix, and the stage's own config_hash check still guards it."""
    keys = {k: json_hash(v) for k, v in parts.items()}
    recorded = stage_dir / RESUME_KEY_FILE
    fresh = f"to start this stage afresh delete {checkpoint} (or use a new output_dir)"
    done = checkpoint_step(checkpoint)
    if done is not None:
        if recorded.exists():
            old = read_json(recorded).get("parts", {})
            changed = sorted(k for k in set(keys) & set(old) if keys[k] != old[k])
            if changed:
                raise ConfigError(f"{stage}: {checkpoint} was written with other settings (changed: "
                                  f"{', '.join(changed)}); restore them to continue it, or {fresh}")
        if done > steps:
            raise ConfigError(f"{steps_key}={steps} is below the {done} steps its checkpoint {checkpoint} has already "
                              f"done; set {steps_key} >= {done} to continue, or {fresh}")
    atomic_write_json(recorded, {"parts": keys})


def check_checkpoints(cfg, out: Path, markers: Stages, keys: dict) -> None:
    """An unfinished stage may only resume a checkpoint written with the same settings and data."""
    out, data = Path(out), keys["data"]
    if cfg.warm_start.enabled and markers.done("warm_start", keys["warm_start"]) is None:
        check_resume(out / WARM_START_DIR, warm_start_checkpoint(out),
                     warm_start_parts(cfg.warm_start, data, keys["prefix"]), cfg.warm_start.steps,
                     "warm_start.steps", "warm start")
    if cfg.ppo.enabled and markers.done("ppo", keys["ppo"]) is None:
        start = keys["warm_start"] if cfg.warm_start.enabled else keys["prefix"]
        check_resume(out / PPO_DIR, ppo_checkpoint(out), ppo_parts(cfg, data, start), cfg.ppo.steps, "ppo.steps",
                     "PPO")


# ---- sweep lengths ---------------------------------------------------------------------------------------------
def sweep_keys(cfg, section, ws_cfg, data: dict) -> tuple[str, str]:
    """(the key, the key an earlier rlprefix recorded) of one length of `rlprefix sweep`: the model, the seed, its
    prefix section and its warm start's checkpoint parts (`warm_start_parts`: the sweep keeps a checkpoint when the
    stage may resume it, and only then). The earlier key hashed every warm-start setting but `progress`, and the
    data but not the general text; a length directory recorded with it is kept when it still matches. `data`: the
    warm start's content hashes (`warm_start_data`)."""
    start = [cfg.model.name, cfg.seed, asdict(section)]
    before = json_hash([*start, {k: v for k, v in asdict(ws_cfg).items() if k != "progress"},
                        [data["ws_data"], data["ws_eval"]]])
    return json_hash([*start, warm_start_parts(ws_cfg, data)]), before
