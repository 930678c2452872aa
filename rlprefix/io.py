"""Safe, atomic persistence: safetensors for tensors, JSON for everything else. Nothing is ever unpickled."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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


def _tmp_sibling(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
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


def write_artifact_dir(out_dir: str | os.PathLike, files: dict[str, dict | dict[str, torch.Tensor]]) -> Path:
    """Write a directory of files so that readers see the old directory or the complete new one.

    `files` maps file names to a JSON object (`*.json`) or a tensor dict (`*.safetensors`). The files
    are written into a temporary sibling, which then replaces `out_dir`; an existing `out_dir` is only
    removed once the new one is in place.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                atomic_save_tensors(tmp / name, content)
            else:
                atomic_write_json(tmp / name, content)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # put the previous artifact back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
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
    return manifest


def base_manifest(spec, kind: str, length: int, dtype: str, name_or_path: str | None,
                  metadata: dict | None) -> dict:
    from . import __version__
    from dataclasses import asdict

    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "rlprefix_version": __version__,
            "kind": kind, "length": length, "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "kv_dim": spec.kv_dim, "dtype": dtype,
            "model": {**asdict(spec), "fingerprint": spec.fingerprint(), "name_or_path": name_or_path},
            "provenance": metadata or {}}


def save_prefix(prefix, path, metadata: dict | None = None, name_or_path: str | None = None) -> Path:
    """Save any prefix (Prefix or CompressedPrefix) as `prefix.safetensors` + `manifest.json`."""
    tensors = {k: v for k, v in prefix.state_dict().items()}
    manifest = base_manifest(prefix.spec, prefix.kind, prefix.length,
                             str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else "float32",
                             name_or_path, metadata)
    manifest["config"] = prefix.config_dict()
    manifest["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    return write_artifact_dir(path, {TENSORS_FILE: tensors, MANIFEST_FILE: manifest})


def load_prefix(path, model=None):
    """Load a saved prefix; with `model`, check it was made for this architecture and move it to its device."""
    from .lowrank import CompressedPrefix
    from .modeling import KVSpec
    from .prefix import Prefix

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
    kind = cfg.pop("kind")
    if kind == "lowrank":
        obj = CompressedPrefix.from_config(spec, cfg)
    else:
        obj = Prefix(spec, cfg.pop("length"), kind, **cfg)
    obj.load_state_dict({k: v.float() for k, v in tensors.items()})
    obj.manifest = manifest
    if model is not None:
        obj.to(model.device)
        if getattr(obj, "anchor_ids", None):
            obj.key_values(model)  # rebuild the anchor K/V now, so later calls need no model
    return obj
