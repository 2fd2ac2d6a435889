"""Errors that reach the user: one line naming the file, the line and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

# The longest message an error carries: whatever a caller quotes, one line stays readable
# (callers quote rejected values with ``safe_files.excerpt``; this is the backstop).
MAX_MESSAGE = 1000


class DataError(ValueError):
    """Bad input data. The CLI prints ``str(error)`` on one line and exits with code 2.

    ``path`` is the offending file, ``line`` its 1-based line number where one applies. A message
    longer than ``MAX_MESSAGE`` characters is cut there.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path = Path(path)
        self.line = line
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 14] + " ... (cut off)"
        self.message = message
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        # Pickled as its arguments, so it crosses process boundaries (DataLoader workers, pools).
        return type(self), (self.path, self.message, self.line)


class SystemFailure(RuntimeError):
    """The machine failed, not the data: out of memory, CUDA, the driver, a decoder library. The
    message says which, in one line; the CLI prints it and exits with code 1 (not 2: the input
    was fine, running again elsewhere or with other settings may succeed)."""


def check_writable_folder(folder: str | Path) -> None:
    """Before any work: ``folder`` can be created or written to (its nearest existing ancestor
    is a folder this process may write), else a DataError naming it and the reason."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise DataError(folder, f"cannot be a folder: {existing} is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(existing) else "no permission to write"
        raise DataError(folder, f"cannot write into {existing} ({reason}); choose another folder")


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
