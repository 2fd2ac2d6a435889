"""Copy a pack to node-local disk, verified against its manifest, and reuse the copy while unchanged.

On shared filesystems (NFS, Lustre, GPFS) DALI's memory-mapped tar reads are slow, as its reader
documentation says; ``stage(shards, to)`` gives a multi-node run one supported way out: copy the pack
once per node to local disk and train from the copy (``affectfast train --stage-dir``).

    LOCAL_DIR/
      manifest.json  train-NNNNNN.tar/.idx  val-NNNNNN.tar/.idx   # the pack, byte for byte
      .stage.json    # the stamp: the source manifest's sha256; per staged file bytes, sha256, mtime
      .stage.lock    # flock'ed while a stage runs; holds the staging process's id

- Verified: every tar is hashed while it is copied and must have the size and sha256 the manifest
  lists; an ``.idx`` (not listed there: pack derives it from its tar) must have its source's size
  and a line per sample the manifest lists, plus the header.
- Reused: a file whose stamp entry still matches (the same sha256 in the manifest, the same size and
  mtime on disk) is not copied again; when the manifest's sha256 and every file match, nothing is
  copied. Checking size and mtime costs a ``stat`` per file; ``recheck=True`` re-hashes the kept
  files too (catches a same-size change whose mtime was preserved).
- Atomic: each file is copied to ``.NAME.PID.staging`` and renamed into place once verified, and
  ``manifest.json`` is written last, so a killed stage never leaves a half file under a final name;
  the next stage removes those temporaries and keeps the files already verified.
- Locked: one stage at a time per folder (``fcntl.flock`` on ``.stage.lock``); a second one waits,
  saying for which process, then finds the copy in place. The ranks of a node rely on this.
- Free space is checked before anything is copied (DataError naming LOCAL_DIR and the bytes needed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from affectfast.console import say
from affectfast.errors import DataError
from affectfast.shards import MANIFEST, load_manifest

STAMP = ".stage.json"
LOCK = ".stage.lock"
TEMP_SUFFIX = ".staging"
CHUNK = 8 << 20  # bytes per read while copying and hashing
STAMP_EVERY_S = 5.0  # how often the stamp is rewritten while copying (what a killed stage keeps)


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
    local.mkdir(parents=True, exist_ok=True)
    if local.resolve() == source.resolve():
        raise DataError(local, "is the pack itself; stage into a folder on node-local disk")
    with _locked(local):
        return _stage(source, local, progress, recheck)


@contextlib.contextmanager
def _locked(local: Path):
    """Hold the folder's stage lock; wait (saying for whom) while another process holds it."""
    fd = os.open(local / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            say(f"waiting for process {holder} staging into {local}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        # The file stays: removing it would let a third process lock a new file while a second
        # still waits on the old one.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _stage(source: Path, local: Path, progress: bool, recheck: bool) -> StageResult:
    manifest = load_manifest(source)
    manifest_bytes = (source / MANIFEST).read_bytes()
    if json.loads(manifest_bytes) != manifest:
        raise DataError(source / MANIFEST, "changed while being read; is a pack still running?")
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    stamp = _read_stamp(local)
    files = _pack_files(source, manifest)
    current = {f.name for f in files if _is_current(local, f, stamp, recheck)}
    todo = [f for f in files if f.name not in current]
    if (
        not todo
        and stamp.get("manifest_sha256") == manifest_sha
        and _same(local / MANIFEST, manifest_bytes)
    ):
        return StageResult(local, 0, 0, len(files))

    for leftover in local.glob(f".*{TEMP_SUFFIX}"):  # from a killed stage (we hold the lock)
        leftover.unlink()
    wanted = {f.name for f in files}
    replaced = [local / name for name in stamp.get("files", {}) if name not in wanted]
    replaced += [local / f.name for f in todo]
    _check_space(local, sum(f.size for f in todo), replaced)

    # From here until the end the folder is not a complete pack: no manifest, an open stamp.
    entries = {name: e for name, e in stamp.get("files", {}).items() if name in current}
    stamp = {"source": str(source.resolve()), "manifest_sha256": None, "files": entries}
    _write_stamp(local, stamp)
    (local / MANIFEST).unlink(missing_ok=True)
    for path in replaced:
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
    """Every tar and .idx the manifest lists, tar before its index."""
    files = []
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            files.append(_File(shard["name"], int(shard["bytes"]), shard["sha256"]))
            idx = source / shard["index"]
            try:
                size = idx.stat().st_size
            except OSError as error:
                raise DataError(
                    idx, f"shard index missing or unreadable ({error.strerror})"
                ) from None
            files.append(_File(shard["index"], size, None, shard["sha256"], int(shard["samples"])))
    return files


def _is_current(local: Path, f: _File, stamp: dict, recheck: bool) -> bool:
    """The staged copy of ``f`` is there and unchanged since it was verified."""
    entry = stamp.get("files", {}).get(f.name)
    if entry is None or (entry["bytes"], entry["sha256"], entry.get("tar_sha256")) != (
        f.size,
        f.sha256 or entry["sha256"],
        f.tar_sha256,
    ):
        return False
    try:
        st = (local / f.name).stat()
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) != (entry["bytes"], entry["mtime_ns"]):
        return False
    return not recheck or _sha256(local / f.name) == entry["sha256"]


def _check_space(local: Path, needed: int, replaced: list[Path]) -> None:
    """DataError unless ``local`` has room for ``needed`` bytes once ``replaced`` are removed."""
    freed = sum(p.stat().st_size for p in replaced if p.is_file())
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
        with open(source / f.name, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(CHUNK):
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
    entry = {"bytes": size, "sha256": sha, "mtime_ns": (local / f.name).stat().st_mtime_ns}
    return entry if f.tar_sha256 is None else {**entry, "tar_sha256": f.tar_sha256}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def _read_stamp(local: Path) -> dict:
    """The folder's stamp; {} when absent. A pack there that no stage wrote is refused."""
    try:
        return json.loads((local / STAMP).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (local / MANIFEST).exists():
            raise DataError(
                local,
                "holds a pack that `affectfast stage` did not write; stage into another folder",
            ) from None
        return {}
    except (OSError, ValueError):
        return {}  # unreadable: copy everything again


def _create_temp(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` for its next version, ``.NAME.PID.staging`` (mode 0666 & ~umask)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), str(temp)


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
