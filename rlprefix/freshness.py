"""Never trust a stale result: stage keys fold in the content of data files, and an unfinished stage's
checkpoint is only resumed when the settings it depends on are the ones it was written with."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ConfigError
from .io import atomic_write_json, read_json, recover_artifact_dir

RESUME_KEY_FILE = "resume_key.json"


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


def _fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resume(stage_dir: Path, checkpoint: Path, parts: dict, steps: int, steps_key: str, stage: str) -> None:
    """Refuse to resume `checkpoint` when any of `parts` (name -> value) differs from the run that wrote it,
    or when it is already past `steps`; otherwise record `parts` as the ones this stage now runs with."""
    recover_artifact_dir(checkpoint)
    keys = {k: _fingerprint(v) for k, v in parts.items()}
    state = checkpoint / "state.json"
    recorded = stage_dir / RESUME_KEY_FILE
    fresh = f"to start this stage afresh delete {checkpoint} (or use a new output_dir)"
    if state.exists():
        if recorded.exists():
            old = read_json(recorded).get("parts", {})
            changed = sorted(k for k in set(keys) | set(old) if keys.get(k) != old.get(k))
            if changed:
                raise ConfigError(f"{stage}: {checkpoint} was written with other settings (changed: "
                                  f"{', '.join(changed)}); restore them to continue it, or {fresh}")
        done = read_json(state).get("step", 0)
        if isinstance(done, int) and done > steps:
            raise ConfigError(f"{steps_key}={steps} is below the {done} steps its checkpoint {checkpoint} has already "
                              f"done; set {steps_key} >= {done} to continue, or {fresh}")
    atomic_write_json(recorded, {"parts": keys})
