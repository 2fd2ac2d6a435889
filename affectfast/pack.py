"""The shard writer: pack an Aff-Wild2 tree into WebDataset tar shards with DALI indexes.

``pack(PackConfig(root, out))`` reads the tree (``affwild2.read_tree``), lays every usable frame
into one columnar numpy index (about 35 bytes per frame: 100 MB for the 2.8M frames of the real
dataset), orders it (val in video/frame order, train shuffled globally with the seed), cuts it into
shards of ``shard_size`` samples and lets worker processes write whole shards. The shard format is
docs/design.md §2 and ``docs/shard-format.md``; its code (names, tar members, ``.idx``) is ``shards.py``.

Guarantees:
- The output bytes depend only on the source and (shard_size, seed, check, skip_bad, test_lists):
  never on the number of workers, on timing or on reruns. Tar headers carry fixed metadata (GNU
  format, mtime 0, uid/gid 0, no user/group names, mode 0o644) and there are no directory entries.
- A shard is written as ``.NAME.tar.tmp`` / ``.NAME.idx.tmp`` and renamed when complete (tar, then
  idx), so nothing partial ever sits under a final name. ``.pack-state.jsonl`` records the source
  fingerprint and settings, then one line per finished shard; a pack killed midway and run again
  reuses the finished shards and writes the rest. Shards from another source or settings are never
  reused: that is a DataError.
- One pack at a time per output folder: ``.pack.lock`` (flock) makes a second one a DataError.
  Locks, the state file and temporaries are never opened through a link (``safe_files``).
- A SIGTERM (what a scheduler sends) stops the worker processes and removes the temporaries
  before pack exits; workers also die with pack however it dies (Linux), so a pack run again at
  once finds no writer left and resumes.
- A bad JPEG is a DataError naming the file, and the shards this run wrote are removed; with
  ``skip_bad`` it is left out, listed and counted in the manifest. ``manifest.json`` comes last.

With ``test_lists`` (ABAW test-set lists, one per task or one for all) it also writes a ``test``
split: every frame with an image of each listed video, the JPEG alone, in video/frame order. The
manifest records each task's list and, for every annotated video, its frame count (what a
submission needs: a line for every frame, faces or not). The train and val shards do not depend
on the test lists: a test split added to a finished pack reuses them.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import re
import signal
import tarfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from affectfast.affwild2 import (
    FRAME_DIGITS,
    AnnotationDirs,
    VideoLabels,
    find_annotation_dirs,
    fingerprint_sources,
    image_path,
    read_test_set,
    read_tree,
    sample_key,
)
from affectfast.console import say
from affectfast.constants import LABELLED_SPLITS
from affectfast.errors import DataError, check_writable_folder
from affectfast.jpeg import CHECKS, JpegError, check_jpeg
from affectfast.safe_files import (
    create_new,
    excerpt,
    exclusive_lock,
    open_regular,
    read_listed,
    read_text,
)
from affectfast.shards import (
    FORMAT_VERSION,
    KEY_RULE,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    check_key,
    check_manifest,
    index_line,
    index_text,
    regular_size,
    shard_name,
    size_text,
    tar_end,
    tar_member,
)
from affectfast.tasks import (
    CHALLENGE_DIRS,
    EXPR_NAMES,
    IMAGE_EXT,
    LABEL_DTYPE,
    LABEL_EXT,
    LABEL_SIZE,
    NUM_AU,
    NUM_EXPR,
    SPLITS,
    TASKS,
    encode_label,
    valid_mask,
)

STATE = ".pack-state.jsonl"
LOCK = ".pack.lock"  # held (flock) by the pack writing into a folder; holds its process id
TMP_SUFFIX = ".tmp"
MAX_FRAME_BYTES = 64 << 20  # a face crop is kilobytes; past this a "frame" is not one
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class PackConfig:
    """What to pack and how. Only shard_size, seed, check, skip_bad and test_lists change the
    output bytes."""

    root: Path | None  # the Aff-Wild2 tree; folders are searched below it
    out: Path  # output folder for shards, indexes and manifest.json
    workers: int = os.cpu_count() or 1
    # Samples per shard (the last of a split may hold fewer). Small enough that a training
    # loader's shuffle buffer (loaders.base.SHUFFLE_BUFFER) spans many shards, so the shards
    # that meet in a batch change with each epoch's shard order; large enough that a shard is
    # still megabytes (about 8 MB at Aff-Wild2's frame sizes) read sequentially.
    shard_size: int = 1000
    seed: int = 0  # seed of the global train shuffle
    check: str = "full"  # "full": decode every JPEG; "header": markers + end only
    skip_bad: bool = False  # leave bad JPEGs out (listed in the manifest), don't fail
    frames: Path | None = None  # explicit folders (override the search under root)
    va: Path | None = None
    expr: Path | None = None
    au: Path | None = None
    # (task, list file) pairs: the ABAW test-set list of each task, packed as the split "test".
    test_lists: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self):
        for name in ("root", "out", "frames", "va", "expr", "au"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        lists = tuple((str(task), Path(path)) for task, path in self.test_lists)
        object.__setattr__(self, "test_lists", lists)
        tasks = [task for task, _ in lists]
        if set(tasks) - set(TASKS) or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"test_lists must name each of {', '.join(TASKS)} at most once: {lists}"
            )
        if self.out is None:
            raise ValueError("out is required")
        if self.root is None and self.frames is None:
            raise ValueError("give root, or the frames folder and the annotation folders")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {self.check!r}")

    def settings(self) -> dict:
        """The settings that decide the output bytes (recorded in the state file). The test
        lists decide them by their content, which the source fingerprint covers, not by how
        their paths are spelled."""
        return {
            "format_version": FORMAT_VERSION,  # a state file of another format is not reused
            "shard_size": self.shard_size,
            "seed": self.seed,
            "check": self.check,
            "skip_bad": self.skip_bad,
        }

    def manifest_config(self) -> dict:
        """The manifest's ``config``: the settings, and the test list files as given."""
        config = self.settings()
        if self.test_lists:  # only then: a pack without a test set keeps the manifest it had
            config["test_lists"] = {task: str(path) for task, path in sorted(self.test_lists)}
        return config


# --- the global index -----------------------------------------------------------------------------


@dataclass
class SampleIndex:
    """Every sample of the tree as numpy columns, row i one frame; no per-frame Python objects."""

    videos: list[str]  # video names, sorted per split; ``video`` holds indexes into this list
    video: np.ndarray  # int32 N
    frame: np.ndarray  # int32 N, 1-based
    split: np.ndarray  # int8 N, the index of the row's split in SPLITS
    va: np.ndarray  # float32 N×2 (NaN: ignored)
    expr: np.ndarray  # int8 N (-1: ignored)
    au: np.ndarray  # int8 N×12 (-1 rows: ignored)

    def __len__(self) -> int:
        return len(self.frame)

    def rows(self, split: str) -> np.ndarray:
        """Row numbers of ``split`` in video/frame order."""
        return np.flatnonzero(self.split == SPLITS.index(split))


def build_index(videos: list[VideoLabels], frames_dir: Path) -> SampleIndex:
    """Concatenate the reader's per-video arrays into one index; check names fit the format."""
    for labels in videos:
        _check_member_names(labels.name, frames_dir)
    lengths = np.array([len(v) for v in videos], dtype=np.int64)

    def column(name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        if not videos:
            return np.zeros((0, *shape), dtype=dtype)
        return np.concatenate([getattr(v, name) for v in videos]).astype(dtype, copy=False)

    return SampleIndex(
        videos=[v.name for v in videos],
        video=np.repeat(np.arange(len(videos), dtype=np.int32), lengths),
        frame=column("frames", np.int32, ()),
        split=np.repeat(np.array([SPLITS.index(v.split) for v in videos], dtype=np.int8), lengths),
        va=column("va", np.float32, (2,)),
        expr=column("expr", np.int8, ()),
        au=column("au", np.int8, (NUM_AU,)),
    )


def _check_member_names(video: str, frames_dir: Path) -> None:
    """Refuse video names that cannot make shard keys (``shards.check_key``: tar headers, DALI
    index lines and source info, webdataset keys all depend on it)."""
    if not check_key(f"{video}/{1:0{FRAME_DIGITS}d}"):
        raise DataError(frames_dir / video, f"video name {video!r} cannot be packed: {KEY_RULE}")


def shuffle_order(index: SampleIndex, split: str, seed: int) -> np.ndarray:
    """The sample order of a split: val as read, train permuted once with ``default_rng(seed)``."""
    rows = index.rows(split)
    if split == "train":
        rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    return rows


# --- writing one shard (runs in a worker process) -------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """One shard's samples: their global rows and the columns the writer needs, in shard order."""

    split: str
    number: int
    rows: np.ndarray
    video: np.ndarray
    frame: np.ndarray
    va: np.ndarray
    expr: np.ndarray
    au: np.ndarray

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


@dataclass(frozen=True)
class WriterContext:
    """What every shard writer shares; sent to each worker process once."""

    out: Path
    frames_dir: Path
    videos: list[str]
    check: str
    skip_bad: bool


@dataclass
class ShardResult:
    """A finished shard (or the bad image that stopped it): what the state file records."""

    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASKS, 0))  # labels
    jpeg_bytes: int = 0  # total size of the jpg members
    frame_sizes: dict[str, int] = field(default_factory=dict)  # "HxW" -> frames of that size
    bad: list[dict] = field(default_factory=list)  # {"row", "key", "path", "error"} per skipped
    error: dict | None = None  # {"path", "message"}: a bad image, not skipped


class _BadImage(Exception):
    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path, self.message = path, message


class _HashingWriter:
    """A file wrapper that hashes and counts what is written."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)


def write_shard(job: ShardJob, context: WriterContext) -> ShardResult:
    """Write one shard and its index under temporary names, then rename them into place."""
    tar_tmp, idx_tmp = (context.out / f".{job.name}{ext}{TMP_SUFFIX}" for ext in (".tar", ".idx"))
    try:
        result, lines = _write_tar(job, context, tar_tmp)
    except _BadImage as bad:
        tar_tmp.unlink(missing_ok=True)
        return ShardResult(job.name, error={"path": str(bad.path), "message": bad.message})
    except OSError as error:  # a full disk: a write() error names no file
        error.filename = error.filename or str(tar_tmp)
        raise
    if result.samples == 0:  # every image was bad: write no shard at all
        tar_tmp.unlink()
        return result
    try:
        _write_new(idx_tmp, index_text(lines).encode("ascii"))
    except OSError as error:
        error.filename = error.filename or str(idx_tmp)
        raise
    os.replace(tar_tmp, context.out / f"{job.name}.tar")
    os.replace(idx_tmp, context.out / f"{job.name}.idx")
    return result


def _write_tar(job: ShardJob, context: WriterContext, path: Path) -> tuple[ShardResult, list[str]]:
    """Stream the shard's samples into ``path``; return the result and the index lines."""
    result = ShardResult(job.name)
    valid = {task: valid_mask(task, getattr(job, task)) for task in TASKS}
    lines = []
    # Keys and image paths as strings built from one per video: pathlib and the name checks cost
    # more than reading a 5 kB file (video names were checked by build_index).
    prefixes = {
        v: (
            sample_key(context.videos[v], 1)[:-FRAME_DIGITS],
            os.fspath(image_path(context.frames_dir, context.videos[v], 1))[:-9],
        )
        for v in np.unique(job.video).tolist()
    }
    # Created exclusively (never through a link planted under the temporary's name); the
    # temporaries of a killed run were removed before any worker started.
    with open(create_new(path), "wb", buffering=1 << 20) as file:
        sink = _HashingWriter(file)
        for i in range(len(job.rows)):
            frame = f"{job.frame[i]:0{FRAME_DIGITS}d}"
            key_prefix, path_prefix = prefixes[int(job.video[i])]
            key, image = key_prefix + frame, f"{path_prefix}{frame}.jpg"
            data, size = _read_checked(image, context.check)
            if isinstance(data, JpegError | OSError):
                if not context.skip_bad:
                    raise _BadImage(image, f"bad image: {data}")
                result.bad.append(
                    {"row": int(job.rows[i]), "key": key, "path": image, "error": str(data)}
                )
                continue
            labelled = [task for task in TASKS if valid[task][i]]
            components = [(f"{key}.{IMAGE_EXT}", data)]
            components += [
                (f"{key}.{LABEL_EXT[task]}", encode_label(task, getattr(job, task)[i]))
                for task in labelled
            ]
            _count_sample(result, labelled, len(data), size)
            entry, offset, listed = [], sink.size, []
            for name, payload in components:
                member = tar_member(name, payload)
                listed.append((name, offset + tarfile.BLOCKSIZE, len(payload)))
                entry.append(member)
                offset += len(member)
            sink.write(b"".join(entry))  # one write and one hash update per sample
            lines.append(index_line(listed))
        sink.write(tar_end(sink.size))
    result.bytes, result.sha256 = sink.size, sink.sha256.hexdigest()
    return result, lines


def read_file(path: str) -> bytes:
    """A frame's bytes (a file the folder listing reported as regular): raw ``os.read`` calls,
    half the cost of ``open().read()`` for 5 kB frames; never blocks (a FIFO swapped in reads as
    empty), never more than ``MAX_FRAME_BYTES + 1`` bytes (see ``safe_files.read_listed``)."""
    return read_listed(path, limit=MAX_FRAME_BYTES)


def _count_sample(result: ShardResult, tasks: list[str], jpeg_bytes: int, size) -> None:
    """Add one written sample to the shard's per-task counts, JPEG bytes and frame sizes."""
    result.samples += 1
    result.jpeg_bytes += jpeg_bytes
    for task in tasks:
        result.counts[task] += 1
    text = size_text(*size)
    result.frame_sizes[text] = result.frame_sizes.get(text, 0) + 1


def _read_checked(path: str, check: str) -> tuple[bytes | JpegError | OSError, tuple | None]:
    """(the file's bytes, its (height, width)) if it is a good JPEG, else (the reason, None)."""
    try:
        data = read_file(path)
    except OSError as error:
        return OSError(f"cannot read: {error.strerror or error}"), None
    if len(data) > MAX_FRAME_BYTES:
        return JpegError(f"more than {MAX_FRAME_BYTES:,} bytes: not a face crop"), None
    try:
        size = check_jpeg(data, check)
    except JpegError as error:
        return error, None
    return data, size


# Each worker process keeps the context it was started with (sent once, not per shard).
_CONTEXT: WriterContext | None = None


def _init_worker(context: WriterContext, parent: int) -> None:
    global _CONTEXT
    _CONTEXT = context
    _die_with(parent)


def _die_with(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when the pack process ``parent`` dies, SIGKILL
    included (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing): a worker left writing
    would race the next pack in the same folder."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _write_in_worker(job: ShardJob) -> ShardResult:
    return write_shard(job, _CONTEXT)


def run_jobs(
    jobs: Iterator[ShardJob], context: WriterContext, workers: int
) -> Iterator[ShardResult]:
    """Write shards in ``workers`` processes (or in this one for 1), keeping few jobs in flight so
    the index is never copied whole into the task queue."""
    if workers == 1:
        for job in jobs:
            yield write_shard(job, context)
        return
    spawn = multiprocessing.get_context("spawn")  # no inherited threads or locks
    # Leaving this block (the results read, an error, SIGTERM via _stop_on_sigterm) terminates
    # the workers: none outlives the pack.
    with spawn.Pool(workers, initializer=_init_worker, initargs=(context, os.getpid())) as pool:
        pending = deque()
        for job in jobs:
            pending.append(pool.apply_async(_write_in_worker, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- the state file: resume safely ----------------------------------------------------------------


class PackState:
    """``.pack-state.jsonl``: line 1 the source fingerprint (of the labelled part) and settings,
    then one line per shard finished (after its tar and idx were renamed into place), and
    ``{"test_set": FINGERPRINT}`` (the whole source, test lists included) before the first
    test shard: train and val shards are reused whatever the test lists; test shards only for
    the same test set."""

    def __init__(self, out: Path, header: dict):
        self.path = out / STATE
        self.out = out
        self.header = header
        self.done: dict[str, dict] = {}
        self.test_set: str | None = None
        self.created = not os.path.lexists(self.path)
        if self.created:
            self._refuse_foreign_files()
            _write_atomic(self.path, json.dumps(header, sort_keys=True) + "\n")
            self._initial = None
        else:
            self._initial = read_text(
                self.path, limit=MAX_MANIFEST_BYTES, follow_links=False, what="pack state file"
            )
            self._load(self._initial)

    def _refuse_foreign_files(self) -> None:
        foreign = sorted(
            p.name for p in self.out.iterdir() if p.suffix in (".tar", ".idx") or p.name == MANIFEST
        )
        if foreign:
            raise DataError(
                self.out,
                f"holds {foreign[0]} but no {STATE}: not written by "
                "`affectfast pack`; remove those files or choose another "
                "--out",
            )

    def _load(self, text: str) -> None:
        lines = text.splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.header:
            raise DataError(self.path, _difference(header, self.header))
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: that shard is redone
                continue
            if isinstance(record, dict) and isinstance(record.get("test_set"), str):
                self.test_set = record["test_set"]
            elif _is_record(record):
                self.done[record["name"]] = record
            else:
                raise DataError(
                    self.path,
                    f"not a shard record pack wrote ({excerpt(record)}); remove the folder or "
                    "choose another --out",
                    number,
                )

    def claim_test_set(self, fingerprint: str | None) -> None:
        """Accept the test set of this pack (``fingerprint`` of the whole source, None without
        test lists): the first one is recorded; another than the one recorded is refused."""
        if fingerprint == self.test_set:
            return
        advice = "give the same --test-videos as before, or choose another --out"
        if self.test_set is not None:
            what = "a test split of other test lists" if fingerprint else "a test split"
            raise DataError(self.path, f"holds {what} (test lists changed); {advice}")
        with open(self._append(), "a", encoding="utf-8") as file:
            file.write(json.dumps({"test_set": fingerprint}) + "\n")
        self.test_set = fingerprint

    def finished(self, name: str) -> dict | None:
        """The record of a finished shard whose files are still in place, else None."""
        record = self.done.get(name)
        if record is None:
            return None
        if record["samples"] == 0:
            return record
        sizes = [regular_size(self.out / f"{name}{ext}") for ext in (".tar", ".idx")]
        if sizes[0] == record["bytes"] and sizes[1] is not None:
            return record
        return None

    def record(self, result: ShardResult) -> dict:
        """Append a finished shard to the state file."""
        record = asdict(result)
        del record["error"]
        with open(self._append(), "a", encoding="utf-8") as file:
            file.write(json.dumps(record, sort_keys=True) + "\n")
        self.done[result.name] = record
        return record

    def _append(self) -> int:
        """A descriptor appending to the state file, never through a link."""
        return open_regular(
            self.path, flags=os.O_WRONLY | os.O_APPEND, follow_links=False, what="pack state file"
        )

    def roll_back(self, names: list[str]) -> None:
        """Remove the shards this run was writing (``names``, recorded or not: a worker may have
        finished one the main process never heard of) and restore the state file as it was."""
        for name in names:
            for ext in (".idx", ".tar"):
                (self.out / f"{name}{ext}").unlink(missing_ok=True)
        if self._initial is None:
            self.path.unlink(missing_ok=True)
        else:
            _write_atomic(self.path, self._initial)


_RECORD_NAME = re.compile(rf"(?:{'|'.join(SPLITS)})-[0-9]{{6,}}")
_RECORD_INTEGERS = ("samples", "bytes", "jpeg_bytes")


def _is_record(record) -> bool:
    """A state line with what the manifest is built from, of the right types (their ranges are
    checked with the manifest, ``shards.check_manifest``)."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and _RECORD_NAME.fullmatch(record["name"]) is not None
        and all(_is_int(record.get(k)) for k in _RECORD_INTEGERS)
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("counts"), dict)
        and all(_is_int(record["counts"].get(task)) for task in TASKS)
        and isinstance(record.get("frame_sizes"), dict)
        and all(isinstance(k, str) and _is_int(v) for k, v in record["frame_sizes"].items())
        and isinstance(record.get("bad"), list)
        and all(
            isinstance(item, dict)
            and _is_int(item.get("row"))
            and all(isinstance(item.get(k), str) for k in ("key", "path", "error"))
            for item in record["bad"]
        )
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _difference(found: dict | None, wanted: dict) -> str:
    """Why an output folder's state does not match this pack, for the error message."""
    advice = "remove the folder or choose another --out"
    if not isinstance(found, dict):
        return f"unreadable pack state; {advice}"
    if found.get("fingerprint") != wanted["fingerprint"]:
        return f"holds shards of another source tree (its annotations or images changed); {advice}"
    settings = found.get("settings") if isinstance(found.get("settings"), dict) else {}
    changed = [
        f"{k} {excerpt(settings.get(k))} -> {excerpt(v)}"
        for k, v in wanted["settings"].items()
        if settings.get(k) != v
    ]
    if changed:
        return f"holds shards packed with other settings ({', '.join(changed)}); {advice}"
    return f"holds shards of another format version; {advice}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:  # our temporary (we hold the lock): a killed run's, or a planted link, is replaced
        _write_new(tmp, text.encode("utf-8"), replace=True)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temporary left behind
        tmp.unlink(missing_ok=True)
        raise


def _write_new(path: Path, data: bytes, replace: bool = False) -> None:
    """Write ``data`` to a file created at ``path`` (``safe_files.create_new``)."""
    with open(create_new(path, replace=replace), "wb") as file:
        file.write(data)


def remove_temporaries(out: Path, shards: list[str]) -> None:
    """Delete the half-written files a killed or failed pack left behind in ``out`` (a folder
    accepted as this pack's): the temporaries of ``shards``, of the state file and the manifest.
    Any other ``.*.tmp`` is not pack's to delete."""
    ours = {f".{name}{ext}{TMP_SUFFIX}" for name in shards for ext in (".tar", ".idx")}
    ours |= {f".{name}{TMP_SUFFIX}" for name in (STATE, MANIFEST)}  # as _write_atomic names them
    for name in ours.intersection(os.listdir(out)):
        (out / name).unlink(missing_ok=True)


@contextmanager
def lock_output(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.pack.lock`` (holding this process id) while packing into
    ``out``: a second pack there would delete the first one's temporaries. It fails at once."""

    def refuse(holder: str) -> None:
        raise DataError(
            out,
            f"locked by process {holder}: another `affectfast pack` is writing here; "
            "wait for it to end or choose another --out",
        )

    # Removed at the end (while still locked); one left by a killed pack holds no lock.
    with exclusive_lock(out / LOCK, on_busy=refuse, remove=True):
        yield


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """While packing, SIGTERM (what a scheduler sends before SIGKILL) raises SystemExit in the
    main thread, so the ``with`` blocks it unwinds stop the worker pool and remove temporaries;
    a second SIGTERM is ignored while that runs. Elsewhere than the main thread, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- statistics and the manifest ------------------------------------------------------------------


def split_stats(index: SampleIndex, rows: np.ndarray) -> dict:
    """Per-task counts of the samples ``rows``: what the trainer needs for weights and checks."""
    stats = {}
    for task in TASKS:
        labels = getattr(index, task)[rows]
        valid = valid_mask(task, labels)
        entry = {"valid": int(valid.sum())}
        if task == "va":
            values = labels[valid].astype(np.float64)
            entry["mean"] = [float(x) for x in values.mean(axis=0)] if len(values) else [0.0, 0.0]
            entry["std"] = [float(x) for x in values.std(axis=0)] if len(values) else [0.0, 0.0]
        elif task == "expr":
            entry["class_counts"] = np.bincount(labels[valid], minlength=NUM_EXPR).tolist()
        else:
            entry["positive_counts"] = (labels[valid] == 1).sum(axis=0).tolist()
        stats[task] = entry
    return stats


def build_manifest(
    config: PackConfig,
    dirs: AnnotationDirs,
    fingerprint: str,
    index: SampleIndex,
    plan: dict[str, list[np.ndarray]],
    records: dict[str, dict],
    ignored: dict[str, int],
) -> dict:
    """The manifest (docs/shard-format.md): source, settings, label layout, per split shards and
    stats of the samples actually written, and per video the entries of its frames folder that
    were not frames (``ignored``)."""
    splits = {}
    for split in plan:
        shards, bad, kept, sizes = [], [], [], {}
        for number, rows in enumerate(plan[split]):
            record = records[shard_name(split, number)]
            bad += [{k: item[k] for k in ("key", "path", "error")} for item in record["bad"]]
            bad_rows = np.array([item["row"] for item in record["bad"]], dtype=np.int64)
            kept.append(rows[~np.isin(rows, bad_rows)])
            if record["samples"]:
                stem = shard_name(split, number)
                shards.append(
                    {
                        "name": f"{stem}.tar",
                        "index": f"{stem}.idx",
                        "samples": record["samples"],
                        "bytes": record["bytes"],
                        "sha256": record["sha256"],
                        "counts": {task: record["counts"][task] for task in TASKS},
                        "jpeg_bytes": record["jpeg_bytes"],
                    }
                )
                for text, count in record["frame_sizes"].items():
                    sizes[text] = sizes.get(text, 0) + count
        kept_rows = np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
        splits[split] = {
            "samples": int(len(kept_rows)),
            "videos": int(len(np.unique(index.video[kept_rows]))),
            "shards": shards,
            "frame_sizes": dict(sorted(sizes.items())),
            "stats": split_stats(index, kept_rows),
            "bad_files": bad,
        }
    return {
        "format": "affectfast-webdataset",
        "format_version": FORMAT_VERSION,
        "source": {
            "fingerprint": fingerprint,
            "root": str(config.root) if config.root is not None else None,
            "frames": str(dirs.frames),
            **{task: str(dirs.task_dir(task)) if dirs.task_dir(task) else None for task in TASKS},
        },
        "config": config.manifest_config(),
        "components": {
            IMAGE_EXT: {"content": "original JPEG bytes"},
            **{
                LABEL_EXT[task]: {
                    "task": task,
                    "dtype": LABEL_DTYPE[task].str,
                    "size": LABEL_SIZE[task],
                }
                for task in TASKS
            },
        },
        "expr_names": list(EXPR_NAMES),
        "splits": splits,
        "ignored_files": ignored,
    }


def add_submission_fields(
    manifest: dict, frame_counts: dict[str, int], test_names: dict[str, list[str]]
) -> None:
    """What a complete submission needs, added to the manifest: ``frame_counts`` (every annotated
    video's frames by its annotation files) and, with a test split, each task's test list."""
    manifest["frame_counts"] = dict(sorted(frame_counts.items()))
    if "test" in manifest["splits"]:
        manifest["splits"]["test"]["lists"] = test_names


# --- the whole pack -------------------------------------------------------------------------------


def _check_output_folder(config: PackConfig, dirs: AnnotationDirs) -> None:
    """Before the tree is read: ``out`` must be writable and outside every input folder (shards
    written into the tree would be read back as part of it, and change its fingerprint)."""
    check_writable_folder(config.out)
    out = config.out.resolve()
    sources = [config.root, dirs.frames, *(dirs.task_dir(task) for task in TASKS)]
    for source in (s.resolve() for s in sources if s is not None):
        if out == source or source in out.parents:
            raise DataError(
                config.out, f"is inside the input tree {source}; choose an --out outside it"
            )


def plan_shards(index: SampleIndex, config: PackConfig) -> dict[str, list[np.ndarray]]:
    """Per split, the global rows of each shard in write order (``test`` only with test lists)."""
    plan = {}
    for split in SPLITS if config.test_lists else LABELLED_SPLITS:
        order = shuffle_order(index, split, config.seed)
        plan[split] = [
            order[i : i + config.shard_size] for i in range(0, len(order), config.shard_size)
        ]
    return plan


def _jobs(
    index: SampleIndex, plan: dict[str, list[np.ndarray]], todo: list[tuple[str, int]]
) -> Iterator[ShardJob]:
    for split, number in todo:
        rows = plan[split][number]
        yield ShardJob(
            split,
            number,
            rows,
            index.video[rows],
            index.frame[rows],
            index.va[rows],
            index.expr[rows],
            index.au[rows],
        )


def pack(config: PackConfig, *, progress: bool = True) -> dict:
    """Pack the tree into ``config.out``; return the manifest (also written as manifest.json)."""
    with _stop_on_sigterm():
        return _pack(config, progress)


def _pack(config: PackConfig, progress: bool) -> dict:
    dirs = find_annotation_dirs(
        config.root, frames=config.frames, va=config.va, expr=config.expr, au=config.au
    )
    _check_output_folder(config, dirs)
    videos = read_tree(dirs, progress=progress)
    if len(videos) == 0:
        raise DataError(
            dirs.frames, "no frame has both an image and a valid label: nothing to pack"
        )
    frame_counts = {video.name: video.frame_count for video in videos}
    labelled = sorted(frame_counts)
    test_videos, test_names = (
        read_test_set(dirs, dict(config.test_lists)) if config.test_lists else ([], {})
    )
    videos += test_videos
    ignored = {video.name: video.ignored_files for video in videos if video.ignored_files}
    index = build_index(videos, dirs.frames)
    del videos  # the index holds copies of its arrays: 70 MB at full scale
    for line in describe_tasks(config, dirs, index):
        say(line)
    labelled_fingerprint, fingerprint = fingerprint_sources(dirs, labelled, test_names)
    plan = plan_shards(index, config)

    config.out.mkdir(parents=True, exist_ok=True)
    with lock_output(config.out):  # before anything in it is read or removed
        state = PackState(
            config.out,
            {
                "format_version": FORMAT_VERSION,
                "fingerprint": labelled_fingerprint,
                "settings": config.settings(),
            },
        )
        state.claim_test_set(fingerprint if config.test_lists else None)
        shards = [(split, n) for split in plan for n in range(len(plan[split]))]
        names = [shard_name(*s) for s in shards]
        remove_temporaries(config.out, names)  # only now: PackState accepted the folder as ours
        todo = [s for s in shards if state.finished(shard_name(*s)) is None]
        done = sum(len(plan[s][n]) for s, n in shards) - sum(len(plan[s][n]) for s, n in todo)
        context = WriterContext(
            config.out, dirs.frames, index.videos, config.check, config.skip_bad
        )
        bar = tqdm(
            total=len(index),
            initial=done,
            unit="frame",
            unit_scale=True,
            desc="packing",
            disable=not progress,
            smoothing=0.1,
        )
        try:
            workers = min(config.workers, len(todo) or 1)
            # closing(): the worker pool is shut down before any clean-up below touches files.
            with closing(run_jobs(_jobs(index, plan, todo), context, workers)) as results:
                for result in results:
                    if result.error is not None:
                        raise DataError(result.error["path"], result.error["message"])
                    state.record(result)
                    bar.update(result.samples + len(result.bad))
        except DataError:
            state.roll_back([shard_name(*s) for s in todo])
            raise
        finally:
            bar.close()
            remove_temporaries(config.out, names)

        records = {shard_name(*s): state.finished(shard_name(*s)) for s in shards}
        manifest = build_manifest(config, dirs, fingerprint, index, plan, records, ignored)
        add_submission_fields(manifest, frame_counts, test_names)
        check_manifest(manifest, state.path)  # what every reader checks: built from the state
        _write_atomic(config.out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def describe_tasks(config: PackConfig, dirs: AnnotationDirs, index: SampleIndex) -> list[str]:
    """What pack found, one line per task (its folder, and per split the videos and frames with
    its label) and for the test split; a warning line for each task without a folder (a
    misnamed folder would otherwise go unnoticed: the pack just lacks that task)."""
    lines = []
    for task in TASKS:
        folder = dirs.task_dir(task)
        if folder is None:
            where = config.root if config.root is not None else "the folders given"
            names = " or ".join(CHALLENGE_DIRS[task])
            lines.append(
                f"warning: no {task} annotation folder ({names}) under {where}: the pack has no "
                f"{task} labels (pass --{task} FOLDER if it is elsewhere)"
            )
            continue
        valid = valid_mask(task, getattr(index, task))
        parts = []
        for split in LABELLED_SPLITS:
            rows = valid & (index.split == SPLITS.index(split))
            videos = len(np.unique(index.video[rows]))
            parts.append(f"{split} {videos} videos, {int(rows.sum()):,} frames")
        lines.append(f"{task}: {'; '.join(parts)} ({folder})")
    if config.test_lists:
        rows = index.split == SPLITS.index("test")
        lines.append(
            f"test: {len(np.unique(index.video[rows]))} videos, {int(rows.sum()):,} frames "
            f"(lists for {', '.join(task for task, _ in config.test_lists)})"
        )
    return lines
