"""An exclusive lock on a run's output directory, so two runs never write into the same one."""
from __future__ import annotations

import os
from pathlib import Path

LOCK_FILE = ".rlprefix.lock"


class OutputDirLocked(RuntimeError):
    """Another process holds the output directory."""


def _try_lock(fd: int) -> bool:
    try:  # the platform's own locking module: fcntl on POSIX, msvcrt on Windows
        import fcntl
    except ImportError:
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class OutputLock:
    """`with OutputLock(dir):` holds `dir/.rlprefix.lock` (fcntl/msvcrt) until exit; the OS drops it if the
    process dies. A second holder is refused with a message naming the first one's pid."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirLocked(f"output_dir {self.path.parent} is in use by another rlprefix run (pid {holder}); "
                                  f"wait for it to finish or use another output_dir")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None
