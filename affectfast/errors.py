"""Errors that reach the user: one line naming the file, the line and what was expected."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data. The CLI prints ``str(error)`` on one line and exits with code 2.

    ``path`` is the offending file, ``line`` its 1-based line number where one applies.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path = Path(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        # Pickled as its arguments, so it crosses process boundaries (DataLoader workers, pools).
        return type(self), (self.path, self.message, self.line)
