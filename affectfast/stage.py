"""Copy a pack to node-local disk, verified against its manifest, and reuse the copy while unchanged.

On shared filesystems (NFS, Lustre, GPFS) DALI's memory-mapped tar reads are slow, as its reader
documentation says; ``stage(shards, to)`` gives a multi-node run one supported way out: copy the pack
once per node to local disk and train from the copy (``affectfast train --stage-dir``).

    LOCAL_DIR/
      manifest.json  train-NNNNNN.tar/.idx  val-NNNNNN.tar/.idx   # the pack, byte for byte
      .stage.json    # the stamp: the source manifest's sha256; per staged file bytes, sha256, mtime
      .stage.lock    # flock'ed while a stage runs; holds the staging process's id

- Only the pack's files: the manifest is checked first (``shards.load_manifest``: every name a
  plain ``<split>-NNNNNN.tar``/``.idx``), and so is the stamp; every file is read and written as a
  regular file of its folder, never through a link (``shards.open_listed``,
  ``safe_files.create_new``). A FIFO, a link or a tar of another size than the manifest lists in
  the source is refused before the lock is taken or anything is copied.
- Never over the user's files: LOCAL_DIR must be new, empty, or a folder stage wrote (it holds the
  stamp); anything else is refused, naming it.
- Verified: every tar is hashed while it is copied and must have the size and sha256 the manifest
  lists; an ``.idx`` (not listed there: pack derives it from its tar) must have its source's size
  and a line per sample the manifest lists, plus the header.
- Reused: a file whose stamp entry still matches (the same sha256 in the manifest, the same size and
  mtime on disk) is not copied again; when the manifest's sha256 and every file match, nothing is
  copied. Checking size and mtime costs a ``stat`` per file; ``recheck=True`` re-hashes the kept
  files too (catches a same-size change whose mtime was preserved).
- Atomic: each file is copied to ``.NAME.PID.staging`` and renamed into place once verified, and
  ``manifest.json`` is written last, so a killed stage never leaves a half file under a final name;
  the next stage removes those temporaries (its own names only) and keeps the files already
  verified.
- Locked: one stage at a time per folder (``fcntl.flock`` on ``.stage.lock``); a second one waits,
  saying for which process, then finds the copy in place. The ranks of a node rely on this.
- Free space is checked before anything is copied (DataError naming LOCAL_DIR and the bytes needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from affectfast.console import say
from affectfast.errors import DataError
from affectfast.safe_files import create_new, excerpt, exclusive_lock, read_bytes
from affectfast.shards import (
    MANIFEST,
    SHARD_FILE,
    check_file_name,
    open_listed,
    read_manifest,
    regular_size,
    stat_listed,
)

STAMP = ".stage.json"
LOCK = ".stage.lock"
TEMP_SUFFIX = ".staging"
CHUNK = 8 << 20  # bytes per read while copying and hashing
STAMP_EVERY_S = 5.0  # how often the stamp is rewritten while copying (what a killed stage keeps)
MAX_STAMP_BYTES = 256 << 20  # a stamp lists every file of the pack: about 200 bytes each
# What a stage writes under a temporary name (``.NAME.PID.staging``): the only temporaries it
# removes, so a user's own ``.*.staging`` files are never touched.
TEMPORARY = re.compile(
    rf"\.(?:{SHARD_FILE.pattern}|{re.escape(MANIFEST)}|{re.escape(STAMP)})\.[0-9]+"
    + re.escape(TEMP_SUFFIX)
)
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StageResult:
    """What one stage did: where the copy is, files and bytes copied, files reused."""

    path: Path
    copied: int
    copied_bytes: int
    reused: int

    def summary(self) -> str:
        if not self.copied:
            return f"{self.path}: reused the staged copy ({self.reused} files unchanged)"
        return (
            f"{self.path}: copied {self.copied} files ({self.copied_bytes / 2**30:.2f} GiB), "
            f"reused {self.reused}"
        )


@dataclass(frozen=True)
class _File:
    """A file of the pack to stage: its name, size and (tars only) sha256 from the manifest."""

    name: str
    size: int
    sha256: str | None
    # For an .idx: the sha256 of the tar it indexes (pack derives an index from its tar's bytes)
    # and the samples the manifest lists for that tar (its line count less the header).
    tar_sha256: str | None = None
    samples: int | None = None


def stage(
    shards: str | Path, to: str | Path, *, progress: bool = False, recheck: bool = False
) -> StageResult:
    """Copy the pack ``shards`` into ``to`` (verified, reused when unchanged); see the module doc."""
    source, local = Path(shards), Path(to)
    manifest_bytes, manifest = read_manifest(source)
    files = _pack_files(source, manifest)  # before anything is locked, created or copied
    local.mkdir(parents=True, exist_ok=True)
    if local.resolve() == source.resolve():
        raise DataError(local, "is the pack itself; stage into a folder on node-local disk")
    _read_stamp(local)  # a folder of the user's files is refused before a lock file goes in

    def wait(holder: str) -> None:
        say(f"waiting for process {holder} staging into {local}")

    # The lock file stays: removing it would let a third process lock a new file while a second
    # still waits on the old one.
    with exclusive_lock(local / LOCK, on_busy=wait):
        return _stage(source, local, manifest_bytes, files, progress, recheck)


def _stage(
    source: Path,
    local: Path,
    manifest_bytes: bytes,
    files: list[_File],
    progress: bool,
    recheck: bool,
) -> StageResult:
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    stamp = _read_stamp(local)
    current = {f.name for f in files if _is_current(local, f, stamp, recheck)}
    todo = [f for f in files if f.name not in current]
    if (
        not todo
        and stamp.get("manifest_sha256") == manifest_sha
        and _same(local / MANIFEST, manifest_bytes)
    ):
        return StageResult(local, 0, 0, len(files))

    _check_sources(source, todo)
    for name in os.listdir(local):  # a killed stage's temporaries (we hold the lock)
        if TEMPORARY.fullmatch(name):
            (local / name).unlink(missing_ok=True)
    wanted = {f.name for f in files}
    replaced = [local / name for name in stamp.get("files", {}) if name not in wanted]
    replaced += [local / f.name for f in todo]
    _check_space(local, sum(f.size for f in todo), replaced)

    # From here until the end the folder is not a complete pack: no manifest, an open stamp.
    entries = {name: e for name, e in stamp.get("files", {}).items() if name in current}
    stamp = {"source": str(source.resolve()), "manifest_sha256": None, "files": entries}
    _write_stamp(local, stamp)
    (local / MANIFEST).unlink(missing_ok=True)
    for path in replaced:  # names checked by the manifest or stamp check: files of ``local``
        path.unlink(missing_ok=True)
    copied_bytes, written = 0, time.monotonic()
    with tqdm(
        total=sum(f.size for f in todo),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"staging into {local}",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for f in todo:
            entries[f.name] = _copy(source, local, f, bar.update)
            copied_bytes += f.size
            if time.monotonic() - written > STAMP_EVERY_S:
                _write_stamp(local, stamp)
                written = time.monotonic()
    _write_atomic(local / MANIFEST, manifest_bytes)
    stamp["manifest_sha256"] = manifest_sha
    _write_stamp(local, stamp)
    return StageResult(local, len(todo), copied_bytes, len(files) - len(todo))


def _pack_files(source: Path, manifest: dict) -> list[_File]:
    """Every tar and .idx the manifest lists, tar before its index. Each that is there must be a
    regular file of the pack folder (never a link); a tar may be missing while its staged copy
    is current (:func:`_check_sources` checks those to be copied)."""
    files = []
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            _source_size(source / shard["name"], missing_ok=True)
            idx_size = _source_size(source / shard["index"])
            files.append(_File(shard["name"], shard["bytes"], shard["sha256"]))
            files.append(_File(shard["index"], idx_size, None, shard["sha256"], shard["samples"]))
    return files


def _source_size(path: Path, missing_ok: bool = False) -> int | None:
    try:
        return stat_listed(path).st_size
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DataError(path, f"listed in {MANIFEST} but missing") from None
    except OSError as error:
        raise DataError(path, f"listed in {MANIFEST} but unreadable ({error.strerror})") from None


def _check_sources(source: Path, todo: list[_File]) -> None:
    """Each file to copy must be in the pack with the size the manifest gives it: a manifest that
    disagrees with its pack is named before free space is counted or anything is removed."""
    for f in todo:
        size = _source_size(source / f.name)
        if size != f.size:
            raise DataError(
                source / f.name,
                f"{size:,} bytes, but {MANIFEST} lists {f.size:,} for it: the manifest and the "
                "pack disagree (run affectfast verify on the pack)",
            )


def _is_current(local: Path, f: _File, stamp: dict, recheck: bool) -> bool:
    """The staged copy of ``f`` is there (a regular file) and unchanged since it was verified."""
    entry = stamp.get("files", {}).get(f.name)
    if entry is None or (entry["bytes"], entry["sha256"], entry.get("tar_sha256")) != (
        f.size,
        f.sha256 or entry["sha256"],
        f.tar_sha256,
    ):
        return False
    try:
        st = stat_listed(local / f.name)
    except (OSError, DataError):
        return False
    if (st.st_size, st.st_mtime_ns) != (entry["bytes"], entry["mtime_ns"]):
        return False
    return not recheck or _sha256(local / f.name) == entry["sha256"]


def _check_space(local: Path, needed: int, replaced: list[Path]) -> None:
    """DataError unless ``local`` has room for ``needed`` bytes once ``replaced`` are removed."""
    freed = sum(regular_size(p) or 0 for p in replaced)
    free = shutil.disk_usage(local).free
    if needed > free + freed:
        raise DataError(
            local,
            f"not enough free space to stage: {needed:,} bytes needed, "
            f"{free + freed:,} available{' (counting the files it replaces)' if freed else ''}",
        )


def _copy(source: Path, local: Path, f: _File, advance) -> dict:
    """Copy one file under a temporary name, hashing it; verify; rename; return its stamp entry."""
    fd, temp = _create_temp(local / f.name)
    try:
        digest, size, lines = hashlib.sha256(), 0, 0
        with open_listed(source / f.name) as src, os.fdopen(fd, "wb") as dst:
            # At most one byte more than the manifest's size: a file that grew is refused.
            while size <= f.size and (chunk := src.read(min(CHUNK, f.size + 1 - size))):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n") if f.samples is not None else 0
                advance(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        sha = digest.hexdigest()
        if size != f.size:
            raise DataError(source / f.name, f"{size} bytes, the manifest says {f.size}")
        if f.sha256 is not None and sha != f.sha256:
            raise DataError(
                source / f.name, "sha256 differs from the manifest (changed or corrupt source)"
            )
        if f.samples is not None and lines != f.samples + 1:
            raise DataError(
                source / f.name,
                f"{lines} lines, but the manifest's {f.samples} samples need a header and one "
                "line each (truncated index?)",
            )
        os.replace(temp, local / f.name)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    entry = {"bytes": size, "sha256": sha, "mtime_ns": stat_listed(local / f.name).st_mtime_ns}
    return entry if f.tar_sha256 is None else {**entry, "tar_sha256": f.tar_sha256}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_listed(path) as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _same(path: Path, data: bytes) -> bool:
    try:
        return read_bytes(path, limit=len(data), follow_links=False) == data
    except (OSError, DataError):
        return False


def _read_stamp(local: Path) -> dict:
    """The folder's stamp, checked; {} for a folder with nothing of the user's in it (new, or left
    by a stage killed before its first stamp). Anything else without a stamp is refused: stage
    replaces and deletes files, and only its own."""
    path = local / STAMP
    try:
        data = read_bytes(path, limit=MAX_STAMP_BYTES, follow_links=False, what="stage stamp")
    except FileNotFoundError:
        theirs = sorted(n for n in os.listdir(local) if n != LOCK and not TEMPORARY.fullmatch(n))
        if theirs:
            raise DataError(
                local,
                f"is not empty ({excerpt(theirs[0])}, {len(theirs)} entries) and has no {STAMP}: "
                "a folder `affectfast stage` did not write; stage into a new or empty folder",
            ) from None
        return {}
    try:
        stamp = json.loads(data)
        _check_stamp(stamp)
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(
            path,
            f"not a stamp `affectfast stage` wrote ({excerpt(str(error))}); remove the folder "
            "or stage into another one",
        ) from None
    return stamp


def _check_stamp(stamp) -> None:
    """The stamp's shape (what ``_stage`` writes); a ValueError says what is wrong."""
    if not isinstance(stamp, dict) or not isinstance(stamp.get("files"), dict):
        raise ValueError("no files")
    sha = stamp.get("manifest_sha256")
    if sha is not None and not (isinstance(sha, str) and _HEX.fullmatch(sha)):
        raise ValueError(f"manifest_sha256 {sha!r}")
    for name, entry in stamp["files"].items():
        if not check_file_name(name):
            raise ValueError(f"a file named {name!r}, not a shard file of the folder")
        if not (
            isinstance(entry, dict)
            and all(_is_integer(entry.get(k)) for k in ("bytes", "mtime_ns"))
            and all(
                isinstance(entry.get(k), str) and _HEX.fullmatch(entry[k])
                for k in ("sha256", *(("tar_sha256",) if "tar_sha256" in entry else ()))
            )
        ):
            raise ValueError(f"the entry of {name}")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` for its next version, ``.NAME.PID.staging`` (mode 0666 & ~umask),
    created exclusively: never through a planted link, a leftover of this name removed first."""
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    return create_new(temp, replace=True), str(temp)


def _write_stamp(local: Path, stamp: dict) -> None:
    _write_atomic(local / STAMP, json.dumps(stamp, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, temp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
