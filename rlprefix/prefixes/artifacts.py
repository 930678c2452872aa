"""The prefix artifact format, in one place: a directory with `prefix.safetensors` and `manifest.json`.

The manifest records the format and its version, the prefix's kind and config, the tensors' shapes and the
architecture it was made for (shapes + a fingerprint), so a loader can refuse a prefix for another model
with one clear line. Nothing is ever unpickled. Each prefix class registers how to build itself from a
manifest config (`register_kind`), so this module needs none of them and they all save through it.

Every artifact read is validated here, in one place, whatever reads it (`load_prefix`, `rlprefix.prefixes.peft`'s
`load_peft_kv`, the server's prefix store): each manifest or PEFT adapter-config field's type and range
(`validate_manifest`, `validate_peft_adapter`), every tensor finite and as listed (`validate_tensors`), and the K/V a
server builds from it (`validate_kv`). A failure is an `ArtifactError` of one line naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from rlprefix.version import __version__
from rlprefix.files import MANIFEST_FILE, TENSORS_FILE, ArtifactError, load_tensors, read_json, write_artifact_dir
from rlprefix.models.spec import KVSpec, ModelMismatchError, kv_spec

FORMAT_NAME = "rlprefix-prefix"
FORMAT_VERSION = 1


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
    """Read and validate `manifest.json` of an rlprefix artifact directory (`validate_manifest`)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an rlprefix prefix directory (expected {MANIFEST_FILE} and "
                            f"{TENSORS_FILE} inside)")
    manifest = read_json(path / MANIFEST_FILE)
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path / MANIFEST_FILE}: format is {_show(manifest.get('format'))}, expected "
                            f"{FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not _is_int(version) or version > FORMAT_VERSION or version < 1:
        raise ArtifactError(f"{path / MANIFEST_FILE}: format_version {_show(version)} is not supported by this "
                            f"rlprefix (reads versions 1..{FORMAT_VERSION}); upgrade rlprefix to read it")
    validate_manifest(manifest, path / MANIFEST_FILE)
    return manifest


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
    validate_tensors(tensors, path / TENSORS_FILE, manifest["tensors"])
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


# ---- validation: the one place every loaded artifact is checked (rlprefix format and PEFT adapter alike) ----------
# Every JSON field a loader reads has a rule (type, range, shape); every tensor must be finite, and the K/V a server
# builds from an artifact must have the model's geometry and be finite in the model's dtype. Each failure is an
# ArtifactError of one line naming the file (or directory) and the field.

class _Invalid(Exception):
    def __init__(self, field: str, why: str):
        super().__init__(f"{field!r} {why}")


Rule = Callable[[object, str], None]  # (value, its field path) -> None, or raise _Invalid


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(low: int) -> Rule:
    def rule(value, at):
        if not _is_int(value) or value < low:
            raise _Invalid(at, f"must be an integer >= {low}, got {_show(value)}")
    return rule


def _str(value, at) -> None:
    if not isinstance(value, str):
        raise _Invalid(at, f"must be a string, got {_show(value)}")


def _bool(value, at) -> None:
    if not isinstance(value, bool):
        raise _Invalid(at, f"must be true or false, got {_show(value)}")


def _optional(rule: Rule) -> Rule:
    def check(value, at):
        if value is not None:
            rule(value, at)
    return check


def _one_of(*allowed) -> Rule:
    def rule(value, at):
        if not isinstance(value, str) or value not in allowed:
            raise _Invalid(at, f"must be one of {list(allowed)}, got {_show(value)}")
    return rule


def _list_of(item: Rule, length: int | None = None) -> Rule:
    def rule(value, at):
        if not isinstance(value, list):
            raise _Invalid(at, f"must be a list, got {_show(value)}")
        if length is not None and len(value) != length:
            raise _Invalid(at, f"must have {length} items, got {len(value)}")
        for i, x in enumerate(value):
            item(x, f"{at}[{i}]")
    return rule


def _object(fields: dict[str, tuple[Rule, bool]]) -> Rule:
    """A JSON object whose listed fields (rule, required) are checked; other fields are let through."""
    def rule(value, at):
        if not isinstance(value, dict):
            raise _Invalid(at, f"must be an object, got {_show(value)}")
        for name, (check, required) in fields.items():
            where = f"{at}.{name}" if at else name
            if name in value:
                check(value[name], where)
            elif required:
                raise _Invalid(where, "is missing")
    return rule


def _mapping(item: Rule) -> Rule:
    """A JSON object of any keys, each value checked by `item`."""
    def rule(value, at):
        if not isinstance(value, dict):
            raise _Invalid(at, f"must be an object, got {_show(value)}")
        for key, x in value.items():
            item(x, f"{at}.{key}")
    return rule


_IDS = _optional(_list_of(_int(0)))
_POSITIVE = _optional(_int(1))
_SPEC_RULE = _object({
    "model_type": (_str, True), "num_layers": (_int(1), True), "num_attention_heads": (_int(1), False),
    "num_kv_heads": (_int(1), True), "head_dim": (_int(1), True), "hidden_size": (_int(1), True),
    "vocab_size": (_int(1), True), "fingerprint": (_str, True), "encoder_decoder": (_bool, False),
    "name_or_path": (_optional(_str), False)})
_MANIFEST_RULE = _object({
    "format": (_str, True), "format_version": (_int(1), True), "rlprefix_version": (_optional(_str), False),
    "kind": (_str, True), "length": (_int(0), True), "num_layers": (_int(1), False), "num_kv_heads": (_int(1), False),
    "head_dim": (_int(1), False), "kv_dim": (_int(1), False), "dtype": (_str, True), "model": (_SPEC_RULE, True),
    "config": (_object({"kind": (_str, True), "length": (_int(0), False)}), True), "provenance": (_object({}), False),
    "tensors": (_mapping(_list_of(_int(0))), True)})
_PREFIX_CONFIG = _object({"mlp_hidden": (_int(1), False), "mlp_input_dim": (_POSITIVE, False),
                          "init_ids": (_IDS, False), "shared_dim": (_POSITIVE, False)})
_CONFIG_RULES = {  # per kind: the fields of its config (the kind's builder refuses fields it does not know)
    **{kind: _PREFIX_CONFIG for kind in ("kv", "mlp", "prompt", "shared")},
    "dynamic": _object({"bank_size": (_int(1), True), "init_ids": (_IDS, False)}),
    "lowrank": _object({"scope": (_one_of("matrix", "shared", "whole"), True),
                        "shapes": (_list_of(_list_of(_int(0), 3)), True), "ranks": (_list_of(_int(0)), True),
                        "anchor_ids": (_IDS, False), "dtype": (_str, False)}),
}
_PEFT_RULE = _object({
    "peft_type": (_str, True), "task_type": (_optional(_str), False), "num_virtual_tokens": (_optional(_int(0)), False),
    "num_layers": (_POSITIVE, False), "token_dim": (_POSITIVE, False), "num_attention_heads": (_POSITIVE, False),
    "num_transformer_submodules": (_POSITIVE, False), "prefix_projection": (_optional(_bool), False),
    "encoder_hidden_size": (_POSITIVE, False), "inference_mode": (_optional(_bool), False),
    "base_model_name_or_path": (_optional(_str), False), "revision": (_optional(_str), False)})


def _apply(rule: Rule, value, where) -> None:
    try:
        rule(value, "")
    except _Invalid as e:
        raise ArtifactError(f"{where}: field {e}") from None


def validate_manifest(manifest: dict, where) -> None:
    """Every field of an rlprefix manifest: its type and range, the shapes it lists, and the fields that must agree
    (kind, length, ranks; token ids within the vocabulary), so no reader meets a KeyError or a TypeError."""
    _apply(_MANIFEST_RULE, manifest, where)
    cfg, length = manifest["config"], manifest["length"]
    if cfg["kind"] != manifest["kind"]:
        raise ArtifactError(f"{where}: kind {manifest['kind']!r} disagrees with config kind {cfg['kind']!r}")
    if cfg.get("length", length) != length:
        raise ArtifactError(f"{where}: length {length} disagrees with config length {cfg['length']}")
    if cfg["kind"] in _CONFIG_RULES:
        try:
            _CONFIG_RULES[cfg["kind"]](cfg, "config")
        except _Invalid as e:
            raise ArtifactError(f"{where}: field {e}") from None
    if cfg["kind"] == "lowrank" and cfg["ranks"] != [s[1] for s in cfg["shapes"]]:
        raise ArtifactError(f"{where}: config ranks {cfg['ranks']} disagree with the factor shapes {cfg['shapes']}")
    vocab = manifest["model"]["vocab_size"]
    for key in ("init_ids", "anchor_ids"):
        if any(i >= vocab for i in cfg.get(key) or ()):
            raise ArtifactError(f"{where}: config {key} holds token ids outside the model's vocabulary of {vocab}")


def validate_tensors(tensors: dict[str, torch.Tensor], where, expected: dict | None = None) -> None:
    """Every tensor finite; with `expected` (a manifest's "tensors"), exactly those names and shapes."""
    if expected is not None:
        want = {k: tuple(v) for k, v in expected.items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if want != found:
            raise ArtifactError(f"{where} does not match its manifest: manifest lists {want}, file holds {found}")
    bad = [k for k, v in tensors.items() if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(f"{where} holds non-finite values (NaN/inf) in {bad}; the prefix is unusable (was it "
                            f"saved from a diverged run?)")


def validate_peft_adapter(cfg: dict, tensors: dict[str, torch.Tensor], config_file, tensors_file) -> torch.Tensor:
    """A PEFT prefix-tuning adapter's config (every field rlprefix reads) and tensors; returns its
    `prompt_embeddings` [P, L*2*kv_dim] (finite, P rows as the config says)."""
    folder = Path(config_file).parent
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ArtifactError(f"{folder} is a {_show(cfg.get('peft_type'))} PEFT adapter, not PREFIX_TUNING")
    _apply(_PEFT_RULE, cfg, config_file)
    if cfg.get("prefix_projection"):
        raise ArtifactError(f"{folder} uses prefix_projection (an MLP encoder); only plain prompt_embeddings are read")
    emb = tensors.get("prompt_embeddings")
    if emb is None or emb.dim() != 2:
        raise ArtifactError(f"{tensors_file} holds no 2-D 'prompt_embeddings' tensor")
    rows = cfg.get("num_virtual_tokens")
    if rows is not None and emb.shape[0] != rows:
        raise ArtifactError(f"{tensors_file}: prompt_embeddings has {emb.shape[0]} rows, the config says "
                            f"num_virtual_tokens {rows}")
    validate_tensors(tensors, tensors_file)
    return emb


def validate_kv(kv: torch.Tensor, spec: KVSpec, where) -> None:
    """The K/V built from an artifact, as a model will use it: [layers, 2, P, kv_dim] of `spec`, finite in its dtype
    (a value that overflows float16/bfloat16 is refused here, not met as NaN logits)."""
    if kv.dim() != 4 or kv.shape[0] != spec.num_layers or kv.shape[1] != 2 or kv.shape[3] != spec.kv_dim:
        raise ArtifactError(f"{where}: its K/V have shape {list(kv.shape)}; the model needs "
                            f"[{spec.num_layers}, 2, length, {spec.kv_dim}]")
    if not torch.isfinite(kv).all():
        raise ArtifactError(f"{where}: its K/V hold non-finite values (NaN/inf) in {str(kv.dtype).replace('torch.', '')}")
