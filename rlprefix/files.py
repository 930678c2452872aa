"""Safe, atomic persistence: safetensors for tensors, JSON for everything else. Nothing is ever unpickled."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# The names of the files rlprefix writes, spelled here only (the lowest floor, so every module can import them).
TENSORS_FILE = "prefix.safetensors"                       # a saved prefix (rlprefix.prefixes.artifacts) ...
MANIFEST_FILE = "manifest.json"                           # ... and its description
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"  # a training checkpoint (rlprefix.train.checkpoint)
PEFT_CONFIG_FILE = "adapter_config.json"                  # a PEFT prefix-tuning adapter (rlprefix.prefixes.peft)
PEFT_TENSORS_FILE = "adapter_model.safetensors"


class ArtifactError(ValueError):
    """A file rlprefix wrote (or was asked to read) is missing, corrupt, or of an unknown format."""


ARTIFACT_FILES = frozenset({TENSORS_FILE, MANIFEST_FILE, STATE_TENSORS, STATE_JSON, PEFT_CONFIG_FILE,
                            PEFT_TENSORS_FILE})

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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write then rename: a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def json_hash(value: Any, blobs: Iterable[bytes] = ()) -> str:
    """The content hash of settings: the first 16 hex digits of sha256 over `value` as JSON (keys sorted; what JSON
    cannot hold, as its str()), then over each of `blobs` (raw content).

    Every "is this still the same?" key is this digest (stage keys and markers, checkpoint config hashes, resume
    parts, sweep lengths) and existing run directories hold them: changing how it is computed makes every finished
    stage run again and every checkpoint refuse to resume."""
    h = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode())
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()[:16]


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


def replaceable_artifact_dir(path: Path) -> bool:
    """What an artifact write may replace without being forced: an empty directory or a previous rlprefix artifact."""
    return path.is_dir() and (not any(path.iterdir()) or is_rlprefix_artifact(path))


def check_artifact_target(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to replace anything at `out_dir` but an empty directory or a previous rlprefix artifact."""
    out = Path(out_dir)
    if overwrite or not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; refusing to replace it (choose another "
                            f"path, or force the overwrite)")
    if not replaceable_artifact_dir(out):
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
