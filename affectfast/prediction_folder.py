"""The folder ``affectfast predict`` writes a submission into, and what it may replace there.

A prediction folder holds ``<Challenge>/<video>.txt`` files and :data:`RECORD`, a hidden JSON
file naming what wrote them and listing every file with its sha256. predict replaces a folder
only when it is missing, empty, or holds exactly what its record lists, byte for byte: anything
else there (a file the user added, one changed since, a record that does not validate, a link)
is refused by name before any inference, and never deleted.

Writing goes through hidden folders beside it, with names fixed by the folder's name (so a run
killed half-way leaves one the next run finds and removes):

    .<name>.predict-staging   the new files, written and checked, then renamed to <name>
    .<name>.predict-old       the earlier folder, set aside during the swap, then deleted
    .<name>.predict.lock      held while writing: two predicts into one folder take turns

``--out`` may be a symbolic link to a folder: the files go into its target and the link stays.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from affectfast.affwild2 import is_video_name
from affectfast.console import say
from affectfast.errors import DataError, check_writable_folder
from affectfast.safe_files import exclusive_lock, read_bytes, sha256_file
from affectfast.tasks import CHALLENGE_DIRS

RECORD = ".affectfast-predict.json"  # hidden: an archive of the challenge folders leaves it out
RECORD_VERSION = 2  # 1 (predict before records listed their files) is refused
RECORD_LIMIT = 64 << 20  # bytes: ~150 bytes per file, a few thousand files
WRITTEN_BY = "affectfast predict"
CHALLENGES = frozenset(names[0] for names in CHALLENGE_DIRS.values())  # the folders it writes
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PredictionFolder:
    """Where a submission goes: ``given`` as the user named it, ``path`` the real folder."""

    given: Path
    path: Path

    def _beside(self, suffix: str) -> Path:
        return self.path.parent / f".{self.path.name}.{suffix}"

    @property
    def staging(self) -> Path:
        return self._beside("predict-staging")

    @property
    def old(self) -> Path:
        return self._beside("predict-old")

    @property
    def lock(self) -> Path:
        return self._beside("predict.lock")


def check_out(out: str | Path, inputs: Iterable[tuple[Path, str]]) -> PredictionFolder:
    """Check ``out`` before any work: a DataError unless predict may write a submission there.

    ``out`` must not hold any of ``inputs`` (``(path, what)``: the checkpoint, the shards, the
    frame-count CSV, ...), must be missing, empty or a prediction folder (see the module
    docstring), and its folder must be writable (missing parents are created when writing).
    Leftovers of a killed run beside it must be predict's own.
    """
    given = Path(out)
    if given.is_symlink() and not given.resolve().is_dir():
        raise DataError(
            given,
            f"--out is a symbolic link to {given.resolve()}, which is not a folder: predict "
            "writes into a link's target folder and never replaces the link",
        )
    folder = PredictionFolder(given, given.resolve())
    if folder.path == folder.path.parent:
        raise DataError(given, "--out cannot be the root folder; choose a folder of its own")
    for path, what in inputs:
        real = Path(path).resolve()
        if real == folder.path or folder.path in real.parents:
            raise DataError(
                given,
                f"--out holds {path} (the {what}): predict replaces its folder, so it needs one "
                "of its own; choose another --out",
            )
    if os.path.lexists(folder.path):
        if not folder.path.is_dir():
            raise DataError(given, "--out exists and is not a folder")
        _check_ours(folder.path, given)
    for leftover in (folder.staging, folder.old):
        _check_leftover(leftover)
    check_writable_folder(folder.path.parent)
    return folder


def write_folder(folder: PredictionFolder, fill: Callable[[Path], dict]) -> None:
    """Write a new prediction folder in place of ``folder``: all of it, or nothing.

    Under the lock: leftovers of a killed run are removed, ``fill(staging)`` writes the files
    into the empty staging folder (and checks them) and returns the record's fields; the record
    is written listing every file with its sha256, ``folder`` is checked again (a file added
    meanwhile is refused, never deleted), and the staging folder takes its place.
    """
    folder.path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.lock, on_busy=_say_waiting(folder), remove=True):
        for leftover in (folder.staging, folder.old):
            _check_leftover(leftover)
            if leftover.exists():
                _remove_ours(leftover)
        folder.staging.mkdir()
        try:
            record = fill(folder.staging)
            _write_record(folder.staging, record)
            if os.path.lexists(folder.path):
                _check_ours(folder.path, folder.given)
            _swap(folder)
        except BaseException:
            _remove_ours(folder.staging)
            raise


def read_record(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the files the record in ``folder`` lists; a DataError for
    a record that is not one predict wrote (a link, not JSON, another layout, paths that could
    point elsewhere)."""
    path = folder / RECORD
    data = read_bytes(path, limit=RECORD_LIMIT, follow_links=False, what="prediction record")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested beyond the parser
        document = None
    if not isinstance(document, dict) or document.get("written_by") != WRITTEN_BY:
        raise DataError(path, "not a prediction record (JSON written by affectfast predict)")
    if document.get("version") != RECORD_VERSION:
        raise DataError(
            path,
            "a record of an older affectfast predict, which does not list its files: move that "
            "folder away or choose another --out",
        )
    files = document.get("files")
    if not isinstance(files, dict) or not all(
        _is_prediction_file(name) and isinstance(digest, str) and _SHA256.fullmatch(digest)
        for name, digest in files.items()
    ):
        raise DataError(
            path, "'files' must map <Challenge>/<video>.txt paths to their sha256 (hex)"
        )
    return files


def _is_prediction_file(name) -> bool:
    """``<Challenge>/<video>.txt`` with a challenge folder predict writes and a plain video name."""
    if not isinstance(name, str):
        return False
    challenge, _, file = name.partition("/")
    return challenge in CHALLENGES and file.endswith(".txt") and is_video_name(file[:-4])


def _check_ours(path: Path, given: Path) -> None:
    """``path`` is empty or holds exactly what its record lists, each file unchanged."""
    entries = sorted(path.iterdir())
    if not entries:
        return
    if not os.path.lexists(path / RECORD):
        raise DataError(
            given,
            f"--out holds {entries[0].name} and is not a prediction folder (no {RECORD}): predict "
            "replaces its folder whole, so choose a new or empty --out",
        )
    listed = read_record(path)
    foreign = _first_foreign(path, listed)
    if foreign is not None:
        entry, why = foreign
        raise DataError(
            entry,
            f"{why}: an earlier prediction folder may hold only the files its {RECORD} lists; "
            "predict never deletes anything else, so move it out or choose another --out",
        )


def _first_foreign(folder: Path, listed: dict[str, str] | None) -> tuple[Path, str] | None:
    """The first entry of ``folder`` predict did not write, and why; None when all are its own.

    ``listed``: the record's files (each must be listed and unchanged), or None for a leftover
    staging folder, whose files are recognised by name and kind alone.
    """
    for entry in sorted(folder.iterdir()):
        mode = entry.lstat().st_mode
        if entry.name == RECORD and stat.S_ISREG(mode):
            continue
        if entry.name not in CHALLENGES or not stat.S_ISDIR(mode):
            return entry, "not written by predict"
        for file in sorted(entry.iterdir()):
            name = f"{entry.name}/{file.name}"
            if not stat.S_ISREG(file.lstat().st_mode) or not _is_prediction_file(name):
                return file, "not written by predict"
            if listed is not None:
                if name not in listed:
                    return file, f"not listed in {RECORD}"
                if sha256_file(file, follow_links=False) != listed[name]:
                    return file, "changed since predict wrote it"
    return None


def _check_leftover(path: Path) -> None:
    """A hidden staging or set-aside folder of a killed run must hold only predict's files."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise DataError(path, "not a folder predict left (its name is predict's): remove it")
    foreign = _first_foreign(path, None)
    if foreign is not None:
        raise DataError(
            foreign[0],
            f"{foreign[1]}, inside {path.name}, a folder only predict writes: remove it",
        )


def _remove_ours(path: Path) -> None:
    """Delete a folder of predict's files, file by file: anything else stops it (rmdir fails)."""
    if not path.is_dir() or path.is_symlink():
        return
    for entry in path.iterdir():
        if entry.name in CHALLENGES and entry.is_dir() and not entry.is_symlink():
            for file in entry.iterdir():
                if _is_prediction_file(f"{entry.name}/{file.name}") and not file.is_symlink():
                    file.unlink()
            entry.rmdir()
    (path / RECORD).unlink(missing_ok=True)
    path.rmdir()


def _write_record(staging: Path, fields: dict) -> None:
    files = {
        f"{challenge.name}/{file.name}": sha256_file(file)
        for challenge in sorted(staging.iterdir())
        for file in sorted(challenge.iterdir())
    }
    record = {"written_by": WRITTEN_BY, "version": RECORD_VERSION, **fields, "files": files}
    (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _swap(folder: PredictionFolder) -> None:
    """Put the staging folder at ``folder.path``; the earlier folder there is set aside (one
    rename), replaced (another) and deleted. A crash between the renames leaves the earlier
    folder as ``.<name>.predict-old``, whole, never a mix of two runs."""
    if not os.path.lexists(folder.path):
        os.rename(folder.staging, folder.path)
        return
    os.rename(folder.path, folder.old)
    try:
        os.rename(folder.staging, folder.path)
    except OSError:
        os.rename(folder.old, folder.path)  # the earlier predictions back in place
        raise
    try:
        _remove_ours(folder.old)
    except OSError as error:  # a file appeared in it during the swap: keep it
        say(f"kept {folder.old}: {error.strerror or error}; it holds files predict did not write")


def _say_waiting(folder: PredictionFolder) -> Callable[[str], None]:
    def waiting(holder: str) -> None:
        say(f"waiting for process {holder}, which is writing predictions into {folder.given}")

    return waiting
