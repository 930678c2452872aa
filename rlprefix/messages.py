"""The CLI's one-line forms: `rlprefix: error: ...` for an error, `rlprefix: warning: ...` for what the library
logs on the `rlprefix` logger."""
from __future__ import annotations

import logging
import sys

# errors whose message says everything; for any other type the message is prefixed with the type's name
PLAIN_ERRORS = ("ConfigError", "ArtifactError", "ModelMismatchError", "RewardError", "NonFiniteError",
                "OutputDirLocked", "ValueError", "FileNotFoundError", "PermissionError", "IsADirectoryError",
                "NotADirectoryError", "FileExistsError")


def error_line(e: BaseException) -> str:
    """One line for the user: the message, with the error's type when the message alone would be cryptic."""
    text = " ".join(str(e).split()) or type(e).__name__
    if type(e).__name__ not in PLAIN_ERRORS:
        text = f"{type(e).__name__}: {text}"
    return f"rlprefix: error: {text}"


class WarningLines(logging.Handler):
    """The library's warnings (logger "rlprefix") in the CLI's one-line form, `rlprefix: warning: ...`, on the
    stderr of the moment (a test's capture included). `rlprefix serve` keeps its own timestamped log format."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(record.getMessage().split())
        print(f"rlprefix: {record.levelname.lower()}: {text}", file=sys.stderr)
