"""Safe, atomic persistence: safetensors for tensors, JSON for everything else. Nothing is ever unpickled."""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_NAME = "rlprefix-prefix"
FORMAT_VERSION = 1
TENSORS_FILE = "prefix.safetensors"
MANIFEST_FILE = "manifest.json"


class ArtifactError(ValueError):
    """A file rlprefix wrote (or was asked to read) is missing, corrupt, or of an unknown format."""


class ModelMismatchError(ValueError):
    """A prefix was made for a model of another architecture."""


ARTIFACT_FILES = frozenset({TENSORS_FILE, MANIFEST_FILE, "state.safetensors", "state.json",
                            "adapter_config.json", "adapter_model.safetensors"})

# Test hook: called with the name of each point of an artifact write ("tmp_written", "new_ready",
# "old_moved", "swapped"), so tests can simulate a crash there. None in normal use.
fault_hook: Callable[[str], None] | None = None


def _fault(point: str) -> None:
    if fault_hook is not None:
        fault_hook(point)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the file the mode a plain open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _tmp_sibling(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    honour_umask(Path(tmp))
    return Path(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write then rename: a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        honour_umask(tmp)  # safetensors creates the file anew
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON (corrupt or truncated?): {e}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} should hold a JSON object, found {type(obj).__name__}")
    return obj


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_names(out: Path) -> tuple[Path, Path]:
    """The complete new copy and the previous copy while `out` is being replaced."""
    return out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")


def recover_artifact_dir(out_dir: str | os.PathLike) -> None:
    """Finish or undo a directory swap that a crash interrupted, and remove leftover temporaries.

    A swap is: write `.NAME.PID.*.tmp`, rename it to `.NAME.new` (complete), rename NAME to `.NAME.old`,
    rename `.NAME.new` to NAME, delete `.NAME.old`. Whatever point a crash stopped at, NAME comes back as
    the newest complete copy.
    """
    out = Path(out_dir)
    new, old = _swap_names(out)
    if not out.exists():
        if new.is_dir():
            os.replace(new, out)
        elif old.is_dir():
            os.replace(old, out)
    for leftover in (new, old):
        if leftover.is_dir() and out.exists():
            shutil.rmtree(leftover, ignore_errors=True)
    if out.parent.is_dir():
        for tmp in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
            pid = tmp.name[len(out.name) + 2:].split(".", 1)[0]
            if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def is_rlprefix_artifact(path: Path) -> bool:
    """A directory that only holds files rlprefix writes (a prefix, a checkpoint or a PEFT adapter)."""
    names = {p.name for p in path.iterdir()}
    return bool(names) and names <= ARTIFACT_FILES


def check_artifact_target(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to replace anything at `out_dir` but an empty directory or a previous rlprefix artifact."""
    out = Path(out_dir)
    if overwrite or not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; refusing to replace it (choose another "
                            f"path, or force the overwrite)")
    if any(out.iterdir()) and not is_rlprefix_artifact(out):
        raise ArtifactError(f"{out} holds files that rlprefix did not write; refusing to replace them (choose an "
                            f"empty or new directory, or force the overwrite)")


def write_artifact_dir(out_dir: str | os.PathLike, files: dict[str, dict | dict[str, torch.Tensor]],
                       overwrite: bool = False) -> Path:
    """Write a directory of files so that readers see the old directory or the complete new one.

    `files` maps file names to a JSON object (`*.json`) or a tensor dict (`*.safetensors`). The files
    are written into a temporary sibling, which then replaces `out_dir`; an existing `out_dir` is only
    removed once the new one is in place, and only when it is a previous rlprefix artifact (or empty)
    unless `overwrite`. A crash part-way is repaired by `recover_artifact_dir` on the next write or start.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_artifact_dir(out)
    check_artifact_target(out, overwrite)
    new, old = _swap_names(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    honour_umask(tmp, directory=True)
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                atomic_save_tensors(tmp / name, content)
            else:
                atomic_write_json(tmp / name, content)
        _fault("tmp_written")
        os.replace(tmp, new)
        _fault("new_ready")
        if out.is_dir() and not out.is_symlink():
            os.replace(out, old)
        elif out.exists() or out.is_symlink():
            out.unlink()  # a file (only with overwrite)
        _fault("old_moved")
        os.replace(new, out)
        _fault("swapped")
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous artifact back
        shutil.rmtree(new, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def check_model_match(manifest: dict, model, where: str) -> None:
    """Refuse a prefix made for another architecture, naming both shapes."""
    from .modeling import kv_spec

    spec = kv_spec(model)
    want = manifest.get("model", {})
    if want.get("fingerprint") != spec.fingerprint():
        have_s = spec.describe()
        want_s = (f"{want.get('model_type')}: {want.get('num_layers')} layers x {want.get('num_kv_heads')} kv heads x "
                  f"head_dim {want.get('head_dim')} (hidden {want.get('hidden_size')}, vocab {want.get('vocab_size')})")
        raise ModelMismatchError(f"{where} was made for a different model: prefix is for [{want_s}] "
                                 f"but the model is [{have_s}]")


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and validate `manifest.json` of an rlprefix artifact directory."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an rlprefix prefix directory (expected {MANIFEST_FILE} and "
                            f"{TENSORS_FILE} inside)")
    manifest = read_json(path / MANIFEST_FILE)
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path / MANIFEST_FILE}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ArtifactError(f"{path / MANIFEST_FILE}: format_version {version!r} is not supported by this rlprefix "
                            f"(reads versions 1..{FORMAT_VERSION}); upgrade rlprefix to read it")
    _check_manifest_fields(manifest, path / MANIFEST_FILE)
    return manifest


_MODEL_FIELDS = ("model_type", "num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "fingerprint")


def _check_manifest_fields(manifest: dict, where: Path) -> None:
    """The fields readers rely on are present and of the right type, so no reader meets a KeyError."""
    model, cfg = manifest.get("model"), manifest.get("config")
    if not isinstance(model, dict):
        raise ArtifactError(f"{where} has no 'model' section (which model the prefix was made for)")
    missing = [k for k in _MODEL_FIELDS if k not in model]
    if missing:
        raise ArtifactError(f"{where}: the 'model' section lacks {missing}")
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ArtifactError(f"{where} has no 'config' section with the prefix kind")
    for key in ("kind", "length", "dtype"):
        if key not in manifest:
            raise ArtifactError(f"{where} lacks the field {key!r}")
    if not isinstance(manifest["length"], int) or manifest["length"] < 0:
        raise ArtifactError(f"{where}: length {manifest['length']!r} is not a non-negative integer")
    if cfg.get("length", manifest["length"]) != manifest["length"]:
        raise ArtifactError(f"{where}: length {manifest['length']} disagrees with config length {cfg['length']}")
    if cfg["kind"] == "lowrank" and not all(k in cfg for k in ("scope", "shapes", "ranks")):
        raise ArtifactError(f"{where}: a low-rank prefix needs scope, shapes and ranks in its config")


def base_manifest(spec, kind: str, length: int, dtype: str, name_or_path: str | None,
                  metadata: dict | None) -> dict:
    from . import __version__
    from dataclasses import asdict

    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "rlprefix_version": __version__,
            "kind": kind, "length": length, "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "kv_dim": spec.kv_dim, "dtype": dtype,
            "model": {**asdict(spec), "fingerprint": spec.fingerprint(), "name_or_path": name_or_path},
            "provenance": metadata or {}}


def save_prefix(prefix, path, metadata: dict | None = None, name_or_path: str | None = None,
                overwrite: bool = False) -> Path:
    """Save any prefix (Prefix or CompressedPrefix) as `prefix.safetensors` + `manifest.json`.

    The base model is recorded (`name_or_path`, else `metadata["model"]`) so that tools can load it later.
    Only a previous rlprefix artifact (or an empty directory) at `path` is replaced, unless `overwrite`.
    """
    name_or_path = name_or_path or (metadata or {}).get("model")
    tensors = {k: v for k, v in prefix.state_dict().items()}
    manifest = base_manifest(prefix.spec, prefix.kind, prefix.length,
                             str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else "float32",
                             name_or_path, metadata)
    manifest["config"] = prefix.config_dict()
    manifest["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    return write_artifact_dir(path, {TENSORS_FILE: tensors, MANIFEST_FILE: manifest}, overwrite=overwrite)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


_LOWRANK_FIELDS = {"length", "scope", "shapes", "ranks", "anchor_ids", "dtype"}


def _build_prefix(spec, cfg: dict):
    from .lowrank import CompressedPrefix
    from .prefix import Prefix

    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind == "lowrank":
        unknown = set(cfg) - _LOWRANK_FIELDS
        if unknown:
            raise TypeError(f"unknown config field(s) {sorted(unknown)}")
        rows_per = spec.num_layers if cfg.get("scope") == "shared" else 1
        if any(rows != rows_per * cfg["length"] for rows, _, _ in cfg["shapes"]):
            raise ValueError(f"length {cfg['length']} disagrees with the factor shapes {cfg['shapes']}")
        return CompressedPrefix.from_config(spec, cfg)
    return Prefix(spec, cfg.pop("length"), kind, **cfg)


def load_prefix(path, model=None):
    """Load a saved prefix; with `model`, check it was made for this architecture and move it to its device."""
    from .modeling import KVSpec

    path = Path(path)
    manifest = read_manifest(path)
    if model is not None:
        check_model_match(manifest, model, str(path))
    try:
        spec = KVSpec(**{k: manifest["model"][k] for k in KVSpec.__dataclass_fields__})
        cfg = dict(manifest["config"])
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path / MANIFEST_FILE} is missing field {e}") from None
    tensors = load_tensors(path / TENSORS_FILE)
    expected = {k: tuple(v) for k, v in manifest.get("tensors", {}).items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        raise ArtifactError(f"{path / TENSORS_FILE} does not match its manifest: manifest lists {expected}, "
                            f"file holds {found}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(f"{path / TENSORS_FILE} holds non-finite values (NaN/inf) in {bad}; the prefix is "
                            f"unusable (was it saved from a diverged run?)")
    cfg.setdefault("length", manifest["length"])
    try:
        obj = _build_prefix(spec, cfg)
        obj.load_state_dict({k: v.float() for k, v in tensors.items()})
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ArtifactError(f"{path / MANIFEST_FILE} does not describe its tensors: {_first_line(e)}") from None
    obj.manifest = manifest
    if model is not None:
        obj.to(model.device)
        if getattr(obj, "anchor_ids", None):
            obj.key_values(model)  # rebuild the anchor K/V now, so later calls need no model
    return obj
