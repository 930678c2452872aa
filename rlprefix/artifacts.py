"""The prefix artifact format, in one place: a directory with `prefix.safetensors` and `manifest.json`.

The manifest records the format and its version, the prefix's kind and config, the tensors' shapes and the
architecture it was made for (shapes + a fingerprint), so a loader can refuse a prefix for another model
with one clear line. Nothing is ever unpickled. Each prefix class registers how to build itself from a
manifest config (`register_kind`), so this module needs none of them and they all save through it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .version import __version__
from .io import MANIFEST_FILE, TENSORS_FILE, ArtifactError, load_tensors, read_json, write_artifact_dir
from .modeling import KVSpec, kv_spec

FORMAT_NAME = "rlprefix-prefix"
FORMAT_VERSION = 1


class ModelMismatchError(ValueError):
    """A prefix was made for a model of another architecture."""


# kind -> builder(spec, kind, config without "kind"): an empty module whose state_dict the file then fills
_KINDS: dict[str, Callable[[KVSpec, str, dict], torch.nn.Module]] = {}


def register_kind(kinds: tuple[str, ...], builder: Callable[[KVSpec, str, dict], torch.nn.Module]) -> None:
    """How `load_prefix` builds a prefix of these kinds (each prefix class registers itself)."""
    for kind in kinds:
        _KINDS[kind] = builder


def check_model_match(manifest: dict, model, where: str) -> None:
    """Refuse a prefix made for another architecture, naming both shapes (and both families: a prefix for an
    encoder-decoder model's decoder never fits a decoder-only model, nor the other way round)."""
    spec = kv_spec(model)
    want = manifest.get("model", {})
    if want.get("fingerprint") != spec.fingerprint():
        # the manifest's shape, described as the model's is (a field a damaged manifest lacks reads None)
        made_for = KVSpec(**{k: want.get(k) for k in KVSpec.__dataclass_fields__})
        have_s, want_s = spec.describe(), made_for.describe()
        why = "" if made_for.family == spec.family else \
            f"; a {made_for.family} model's prefix cannot steer a {spec.family} model"
        raise ModelMismatchError(f"{where} was made for a different model: prefix is for [{want_s}] "
                                 f"but the model is [{have_s}]{why}")


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
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "rlprefix_version": __version__,
            "kind": kind, "length": length, "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "kv_dim": spec.kv_dim, "dtype": dtype,
            "model": {**spec.as_dict(), "fingerprint": spec.fingerprint(), "name_or_path": name_or_path},
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


def _build_prefix(spec: KVSpec, cfg: dict):
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown prefix kind {kind!r} (this rlprefix reads {sorted(_KINDS)})")
    return _KINDS[kind](spec, kind, cfg)


def load_prefix(path, model=None):
    """Load a saved prefix; with `model`, check it was made for this architecture and move it to its device."""
    path = Path(path)
    manifest = read_manifest(path)
    if model is not None:
        check_model_match(manifest, model, str(path))
    try:
        spec = KVSpec(**{k: manifest["model"][k] for k in KVSpec.__dataclass_fields__ if k in manifest["model"]
                         or k != "encoder_decoder"})
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
