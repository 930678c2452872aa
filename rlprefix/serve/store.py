"""The prefixes a server offers: every artifact directory under a root, by directory name, plus `base`.

Each entry keeps its K/V ([layers, 2, P, kv_dim], on the model's device) computed once at load; an image prefix
(kind "image") has no single K/V and is kept itself, with its encoder opened and checked at load: each request's
image gives that request's K/V (`image_input`). Other input-conditioned prefixes (kind "dynamic") are refused. A rescan
loads new or changed directories and drops removed ones. Every artifact is validated where the format is
(`rlprefix.prefixes.artifacts`: each manifest or adapter-config field, finite tensors, the K/V's shape and
finiteness in the model's dtype); a directory that fails (a damaged file, a prefix for another architecture,
anything its loader raises) is refused with one log line naming it, once until it changes, and the others
still load. Only safetensors + JSON are read.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rlprefix.images.conditions import encoder_for, is_image_prefix
from rlprefix.prefixes.artifacts import load_prefix, validate_kv
from rlprefix.files import MANIFEST_FILE, ArtifactError
from rlprefix.prefixes.peft import PEFT_CONFIG_FILE, load_peft_kv
from rlprefix.models.sampling import model_dtype
from rlprefix.models.spec import kv_spec

BASE = "base"
log = logging.getLogger("rlprefix.serve.store")


@dataclass(frozen=True)
class ServedPrefix:
    name: str
    kind: str                     # base, kv, mlp, prompt, lowrank, peft, image
    length: int
    kv: torch.Tensor | None       # None for the bare model and for an image prefix
    path: str | None
    signature: tuple = ()
    image: object = None          # kind image: the ImagePrefix that turns each request's image into its K/V


def dir_signature(path: Path) -> tuple:
    """Changes when any file in the directory is replaced (artifacts are written by rename)."""
    return tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in path.iterdir() if f.is_file()))


@torch.no_grad()
def load_served(path: Path, model) -> tuple[str, torch.Tensor | None]:
    """(kind, K/V) of an rlprefix artifact (full or compressed) or a PEFT prefix-tuning adapter directory; K/V None
    for an image prefix (`load_entry` gives the prefix)."""
    kind, kv, _ = load_entry(path, model)
    return kind, kv


@torch.no_grad()
def load_entry(path: Path, model) -> tuple[str, torch.Tensor | None, object]:
    """(kind, K/V, None), or for an image prefix ("image", None, the prefix)."""
    if (path / MANIFEST_FILE).exists():
        prefix = load_prefix(path, model)
        if is_image_prefix(prefix):
            return prefix.kind, None, checked_image_prefix(prefix, model, path)
        kind, kv = prefix.kind, prefix.key_values(model)
    elif (path / PEFT_CONFIG_FILE).exists():
        kind, kv = "peft", load_peft_kv(path, model)
    else:
        raise ArtifactError(f"{path} holds neither {MANIFEST_FILE} nor {PEFT_CONFIG_FILE}")
    kv = kv.detach().to(device=model.device, dtype=model_dtype(model))
    validate_kv(kv, kv_spec(model), path)
    return kind, kv, None


def checked_image_prefix(prefix, model, path: Path):
    """The image prefix, ready for requests: its encoder opens and gives the features it takes, and the K/V of its
    mean feature fit the model (shape, finite in the model's dtype)."""
    prefix.eval()
    encoder_for(prefix)
    kv = prefix.key_values(model, features=prefix.mean[None])[0]
    validate_kv(kv.detach().to(device=model.device, dtype=model_dtype(model)), kv_spec(model), path)
    return prefix


def one_line(e: BaseException) -> str:
    """An exception as one log line: its message (newlines folded), with its type when it is not a loader's own."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ArtifactError, ValueError, OSError)) else f"{type(e).__name__}: {text}"


class PrefixStore:
    def __init__(self, model, root: str | Path | None):
        self.model, self.root = model, Path(root) if root else None
        self._entries = {BASE: ServedPrefix(BASE, BASE, 0, None, None)}
        self._refused: dict[str, tuple[tuple, str]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ServedPrefix | None:
        return self._entries.get(name)

    def entries(self) -> list[ServedPrefix]:
        return list(self._entries.values())

    def refused(self) -> dict[str, str]:
        return {name: reason for name, (_, reason) in self._refused.items()}

    def scan(self) -> dict:
        """Load new/changed directories, drop removed ones; returns what changed."""
        with self._lock:
            report = {"loaded": [], "removed": [], "refused": {}}
            found = self._candidates()
            entries = {BASE: self._entries[BASE]}
            for name, path in found.items():
                entry = self._scan_one(name, path, report)
                if entry is not None:
                    entries[name] = entry
            report["removed"] = sorted(set(self._entries) - set(entries))
            self._refused = {n: r for n, r in self._refused.items() if n in found}
            self._entries = entries  # one assignment: readers see the old set or the new one
            return report

    def _candidates(self) -> dict[str, Path]:
        if self.root is None:
            return {}
        if not self.root.is_dir():
            raise FileNotFoundError(f"prefix directory {self.root} does not exist")
        return {p.name: p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")}

    def _scan_one(self, name: str, path: Path, report: dict) -> ServedPrefix | None:
        try:
            sig = dir_signature(path)
        except OSError as e:  # removed or unreadable while scanning
            sig = ("unreadable", str(e))
        old = self._entries.get(name)
        if old is not None and old.signature == sig:
            return old
        if name in self._refused and self._refused[name][0] == sig:
            return None  # refused before and unchanged: no new log line
        try:
            if sig[0] == "unreadable":
                raise OSError(f"cannot read {path}: {sig[1]}")
            if name == BASE:
                raise ArtifactError(f"the name {BASE!r} is reserved for the bare model; rename the directory")
            kind, kv, image = load_entry(path, self.model)
        except Exception as e:  # whatever one directory holds, the others still load and the server keeps serving
            reason = one_line(e)
            log.warning("refusing prefix %r from %s: %s", name, path, reason)
            self._refused[name] = (sig, reason)
            report["refused"][name] = reason
            return None
        length = image.length if image is not None else int(kv.shape[2])
        log.info("serving prefix %r (%s, %d virtual tokens) from %s", name, kind, length, path)
        report["loaded"].append(name)
        self._refused.pop(name, None)
        return ServedPrefix(name, kind, length, kv, str(path), sig, image)
