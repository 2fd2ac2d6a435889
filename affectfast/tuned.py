"""Choices tuned on a labelled split and kept beside the checkpoint they were tuned for.

``affectfast evaluate`` tunes them (``--tune-smoothing``: a smoothing window per task;
``--tune-au-thresholds``: a threshold per AU) and ``affectfast predict`` applies them. Each is a
small JSON file beside its checkpoint, named after it, so ``best.pt`` and ``last.pt`` of one run
keep their own::

    runs/mtl/best.pt
    runs/mtl/best.smoothing.json       # tuned_path(checkpoint, SMOOTHING)
    runs/mtl/best.au_thresholds.json   # tuned_path(checkpoint, AU_THRESHOLDS)

Each file records the checkpoint's fingerprint (its file name and sha256). A checkpoint rewritten
since (``best.pt`` after more epochs, a file copied over it from another run) no longer matches,
and reading the file is then a one-line DataError saying to tune again: windows or thresholds are
never applied to a model they were not chosen for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affectfast.errors import DataError
from affectfast.safe_files import excerpt, read_text, sha256_file
from affectfast.tasks import NUM_AU

SMOOTHING, AU_THRESHOLDS = "smoothing", "au_thresholds"  # the kinds, and the files' middle names
FORMAT_VERSION = 2  # 1 (smoothing.json without a fingerprint) is no longer read
FILE_LIMIT = 1 << 20  # bytes: a tuned file is a few kB
TUNE_FLAG = {SMOOTHING: "--tune-smoothing", AU_THRESHOLDS: "--tune-au-thresholds"}


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a checkpoint: its file name and the sha256 of its bytes."""

    file: str
    sha256: str

    @classmethod
    def of(cls, checkpoint: str | Path) -> Fingerprint:
        """Hash the checkpoint (a regular file; a FIFO or a device is a DataError, never read)."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.name, sha256_file(checkpoint, what="checkpoint"))

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256}


def tuned_path(checkpoint: str | Path, kind: str) -> Path:
    """The file of ``kind`` beside ``checkpoint``: ``best.pt`` -> ``best.<kind>.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.{kind}.json")


def write_tuned(path: str | Path, kind: str, fingerprint: Fingerprint, body: dict) -> Path:
    """Write ``body`` with the kind, format version and fingerprint; to a temporary file, then
    renamed, so a reader never sees half a file."""
    path = Path(path)
    document = {"version": FORMAT_VERSION, "kind": kind, "checkpoint": fingerprint.to_dict()}
    document.update(body)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def read_tuned(path: str | Path, kind: str, fingerprint: Fingerprint) -> dict:
    """The document of ``path`` (a JSON object of ``kind`` tuned for ``fingerprint``'s
    checkpoint), read with bounds; anything else is a one-line DataError naming the file."""
    path = Path(path)
    try:
        text = read_text(path, limit=FILE_LIMIT, what=f"{kind} file")
    except OSError as error:
        raise DataError(path, f"cannot read the {kind} file: {error.strerror}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, f"not JSON ({error.msg})", error.lineno) from None
    except RecursionError:
        raise DataError(path, "not JSON this reader takes: nested too deeply") from None
    again = f"run `affectfast evaluate CKPT SHARDS {TUNE_FLAG[kind]}` again"
    if not isinstance(document, dict) or document.get("kind", kind) != kind:
        raise DataError(path, f"not a {kind} file written by affectfast evaluate; {again}")
    if document.get("version") != FORMAT_VERSION:
        raise DataError(
            path,
            f"format version {excerpt(document.get('version'))}, not {FORMAT_VERSION} (an older "
            f"file records no checkpoint, so it cannot be matched to one); {again}",
        )
    recorded = document.get("checkpoint")
    if recorded != fingerprint.to_dict():
        saved = recorded.get("file") if isinstance(recorded, dict) else None
        raise DataError(
            path,
            f"tuned for another checkpoint ({excerpt(saved)} with other bytes) than "
            f"{fingerprint.file}, which was written since; {again}",
        )
    return document


# --- per-AU thresholds ----------------------------------------------------------------------------


def save_au_thresholds(
    path: str | Path, fingerprint: Fingerprint, thresholds, split: str, scores: dict[str, float]
) -> Path:
    """Write the 12 per-AU ``thresholds`` tuned on ``split`` (``scores``: AU F1 at 0.5 and at
    the thresholds, on that split) for ``fingerprint``'s checkpoint."""
    values = [float(t) for t in thresholds]
    _check_thresholds(Path(path), values)
    body = {"split": split, "thresholds": values, "scores": dict(scores)}
    return write_tuned(path, AU_THRESHOLDS, fingerprint, body)


def load_au_thresholds(path: str | Path, fingerprint: Fingerprint) -> tuple[np.ndarray, str]:
    """(the 12 thresholds, the split they were tuned on) from what :func:`save_au_thresholds`
    wrote for ``fingerprint``'s checkpoint; DataError for anything else."""
    document = read_tuned(path, AU_THRESHOLDS, fingerprint)
    values = document.get("thresholds")
    _check_thresholds(Path(path), values)
    split = document.get("split")
    if not isinstance(split, str):
        raise DataError(path, f"'split' must name the split tuned on, got {excerpt(split)}")
    return np.asarray(values, dtype=np.float64), split


def _check_thresholds(path: Path, values) -> None:
    fine = (
        isinstance(values, list)
        and len(values) == NUM_AU
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        and all(0 < v < 1 for v in values)
    )
    if not fine:
        raise DataError(
            path, f"'thresholds' must be {NUM_AU} numbers in (0, 1), got {excerpt(values)}"
        )
