"""The shard format in code: names, tar members, DALI ``.idx`` files and the manifest.

The contract between ``pack`` (the writer) and every reader (verify, the loaders, train, evaluate,
predict, the benchmarks) is ``docs/shard-format.md``; this module is its code, and the only module
a reader of shards imports to understand them:

- names: ``<split>-NNNNNN.tar`` + ``.idx`` beside it, ``manifest.json``;
- tar members: GNU headers with fixed metadata (byte-identical packs), written here for the writer;
- ``.idx``: DALI's ``wds2idx`` ``v1.2`` text index, encoded here for the writer (DALI parses it);
- a split's shards for the readers (:class:`Shard`, ``split_shards``, ``sample_counts``,
  ``frame_sizes``): from the manifest, in O(shards) time and memory;
- the manifest: ``load_manifest`` and its one-line ``manifest_summary``.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affectfast.errors import DataError
from affectfast.tasks import LABEL_EXT, NUM_AU, NUM_EXPR, SPLITS, TASKS, split_member

# 2: per-shard task counts and JPEG bytes, per-split frame sizes (readers need no .idx parse).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
IDX_VERSION = "v1.2"  # the first token of a DALI wds2idx index file
# A ustar/GNU header holds names up to 99 bytes in one 512-byte block; longer names would need a
# GNU long-name entry, which DALI's index offsets do not expect.
MAX_MEMBER_NAME = 99


# --- sample keys ---------------------------------------------------------------------------------

# A video name is printable ASCII without '.', '/', ':' or whitespace (0x21-0x7E less those three):
# DALI and webdataset split a member's extension at its first dot, a '/' would make a path of the
# key ("../x", "/abs"), DALI's source_info "<tar>:<offset>:<member>" is split at ':', and .idx
# lines are space-separated.
KEY_PATTERN = re.compile(r"[!-\-0-9;-~]+/[0-9]{5}")
# The longest member is "<key>.expr", and a member name must fit one tar header.
MAX_KEY = MAX_MEMBER_NAME - len(".expr")
KEY_RULE = (
    "a sample key is <video>/<NNNNN> (5 digits) of at most "
    f"{MAX_KEY} characters, the video name printable ASCII without '.', '/', ':' or spaces"
)


def check_key(key: str) -> bool:
    """True for a well-formed sample key (``KEY_RULE``): the one rule pack, verify and every
    loader apply to the keys they write or read."""
    return len(key) <= MAX_KEY and KEY_PATTERN.fullmatch(key) is not None


# --- names ---------------------------------------------------------------------------------------


def shard_name(split: str, number: int) -> str:
    """``train-000003``: the stem of a shard's .tar and .idx."""
    return f"{split}-{number:06d}"


# --- tar members (the writer's side) -------------------------------------------------------------


def tarfile_header(name: str, size: int) -> bytes:
    """The GNU header ``tarfile`` writes for a regular file with our fixed metadata (the reference)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


# tarfile's header encoder (up to 4 members a sample) dominated a header-checked pack's CPU time in
# profiling. Every header we write differs from tarfile's template for an empty name only in the
# name, size and checksum fields, so we fill those in, several times cheaper. tests/test_pack.py checks the
# result equals tarfile_header() for every member of the test shards.
_TEMPLATE = bytearray(tarfile_header("", 0))
_TEMPLATE[148:156] = b" " * 8  # the checksum is summed with its own field as 8 spaces
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 155)
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[_SIZE])


def tar_header(name: str, size: int) -> bytes:
    """GNU header of a member: equal to ``tarfile_header(name, size)`` for names of at most 99
    ASCII bytes and sizes below 8 GiB (both guaranteed by the shard format)."""
    encoded = name.encode("ascii")
    size_field = b"%011o\0" % size
    header = _TEMPLATE.copy()
    header[: len(encoded)] = encoded
    header[_SIZE] = size_field
    header[_CHKSUM] = b"%06o\0" % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return bytes(header)


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file entry: header, data, NUL padding to a whole block."""
    return tar_header(name, len(data)) + data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)


def tar_end(size: int) -> bytes:
    """The end of an archive of ``size`` bytes, as ``tarfile.TarFile.close`` writes it: two zero
    blocks, then zeros up to a whole record."""
    size += 2 * tarfile.BLOCKSIZE
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE))


def index_line(components: list[tuple[str, int, int]]) -> str:
    """One sample's line of a DALI index: ``ext offset size name`` per component, in tar order.

    ``components`` holds (member name, data offset, size); the extension is everything after the
    first dot of the file name, as DALI's ``wds2idx`` splits it.
    """
    parts = []
    for name, offset, size in components:
        parts.append(f"{split_member(name)[1]} {offset} {size} {name}")
    return " ".join(parts)


def index_text(lines: list[str]) -> str:
    """A whole DALI index file (the ``v1.2`` format ``wds2idx`` writes) from its sample lines."""
    return f"{IDX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


# --- the shards of a split (the readers' side) ----------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One tar of a split, as the manifest lists it: no per-sample state, so a reader's start-up
    and memory do not grow with the samples (DALI parses the ``.idx`` itself)."""

    tar: Path
    idx: Path
    samples: int  # samples in the tar
    counts: dict[str, int]  # per task: samples holding that task's label
    bytes: int  # the tar's size
    jpeg_bytes: int  # total size of the jpg members
    first_key: str | None = None  # the key the .idx lists first (None: an empty shard)

    def count(self, tasks: tuple[str, ...]) -> int:
        """Samples a loader of ``tasks`` reads here: uni-task keeps those with its label; a
        multi-task one, or one reading no label (the unlabelled test split), every sample."""
        return self.samples if len(tasks) != 1 else self.counts[tasks[0]]


def split_shards(shards: str | Path, split: str) -> list[Shard]:
    """The shards of ``split`` in a pack folder, in the manifest's order, checked cheaply.

    One ``stat`` per file and the first line of each ``.idx``: a tar whose size differs from the
    manifest's (truncated, or another file) or an index whose sample count differs (another
    shard's) is a DataError naming it here, rather than a failure deep inside DALI's reader or
    mid-epoch in webdataset. ``affectfast verify`` checks every byte.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(shards)
    entries = _manifest_shards(folder, split)
    if not entries:
        raise DataError(folder / MANIFEST, f"lists no {split} shards")
    return [_checked_shard(folder, entry) for entry in entries]


def _checked_shard(folder: Path, entry: dict) -> Shard:
    tar, idx = folder / entry["name"], folder / entry["index"]
    try:
        size = tar.stat().st_size
    except OSError:
        raise DataError(tar, f"shard listed in {MANIFEST} is missing or unreadable") from None
    if size != entry["bytes"]:
        what = "truncated shard" if size < entry["bytes"] else "shard of another size"
        raise DataError(
            tar,
            f"{what}: {size} bytes, the manifest says {entry['bytes']}; re-run pack or copy "
            "it again",
        )
    samples, first = read_index_head(idx)
    if samples != entry["samples"]:
        raise DataError(idx, f"indexes {samples} samples, the manifest says {entry['samples']}")
    if first is not None:
        check_index_matches(tar, idx, *first)
    first_key = split_member(first[0])[0] if first is not None else None
    counts = dict(entry["counts"])
    return Shard(tar, idx, entry["samples"], counts, entry["bytes"], entry["jpeg_bytes"], first_key)


def read_index_head(idx: Path) -> tuple[int, tuple[str, int] | None]:
    """(the sample count a ``.idx`` declares, (its first member's name, data offset) or None).

    Two lines of the file: the readers' whole cost of an index (DALI parses it for itself).
    """
    try:
        with open(idx, "rb") as f:
            header, first = f.readline(64).split(), f.readline(4096).split()
    except OSError as error:
        raise DataError(idx, f"cannot read the shard index: {error.strerror}") from None
    if len(header) != 2 or not header[0].startswith(b"v1.") or not header[1].isdigit():
        raise DataError(idx, "not a wds2idx index (first line 'v1.2 N')", 1)
    if not first:
        return int(header[1]), None
    if len(first) < 4 or not first[1].isdigit():
        raise DataError(idx, "expected groups of 'ext offset size name'", 2)
    name = first[3].decode("ascii", errors="replace")
    if not check_key(split_member(name)[0]):
        raise DataError(idx, f"member {name!r} is not a sample's: {KEY_RULE}", 2)
    return int(header[1]), (name, int(first[1]))


def check_index_matches(tar: Path, idx: Path, name: str, offset: int) -> None:
    """The tar header just before the first sample's data must name it: a swapped, stale or
    foreign ``.idx`` is a DataError here, before DALI reads wrong offsets (one 512-byte read)."""
    start = offset - tarfile.BLOCKSIZE
    try:
        with open(tar, "rb") as file:
            file.seek(max(start, 0))
            header = file.read(tarfile.BLOCKSIZE)
    except OSError as error:
        raise DataError(tar, f"cannot read the shard: {error.strerror}") from None
    found = header[:100].split(b"\0", 1)[0].decode("ascii", errors="replace")
    if start < 0 or found != name:
        raise DataError(
            idx,
            f"does not match {tar.name}: its first member {name} is {found!r} there (a swapped "
            "or stale index); run affectfast verify",
        )


def _manifest_shards(folder: Path, split: str) -> list[dict]:
    """The manifest's shard entries of ``split`` (docs/shard-format.md), each checked for shape."""
    manifest = load_manifest(folder)
    try:
        entries = manifest["splits"][split]["shards"]
        for entry in entries:
            for name in ("name", "index"):
                if not isinstance(entry[name], str) or "/" in entry[name]:
                    raise ValueError(f"{name} {entry[name]!r} is not a file name")
            for name in ("samples", "bytes", "jpeg_bytes"):
                if not isinstance(entry[name], int) or entry[name] < 0:
                    raise ValueError(f"{name} {entry[name]!r} is not a count")
            if not all(isinstance(entry["counts"][task], int) for task in LABEL_EXT):
                raise ValueError(f"counts {entry['counts']!r} lack a task")
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(
            folder / MANIFEST,
            f"bad shard list for split {split!r} ({type(error).__name__}: {error})",
        ) from None
    return entries


def sample_counts(shards: list[Shard], tasks: tuple[str, ...]) -> np.ndarray:
    """Samples per shard that a loader of ``tasks`` yields (before splitting across ranks)."""
    return np.array([s.count(tasks) for s in shards], dtype=np.int64)


def frame_sizes(shards: str | Path, split: str) -> dict[tuple[int, int], int]:
    """(height, width) -> frames of that size in ``split``, from the manifest."""
    manifest = load_manifest(shards)
    try:
        sizes = manifest["splits"][split]["frame_sizes"]
        return {_parse_size(text): int(count) for text, count in sizes.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(
            Path(shards) / MANIFEST, f"bad frame_sizes for split {split!r} ({error})"
        ) from None


def size_text(height: int, width: int) -> str:
    """``"112x112"``: how the manifest writes a frame size (height x width)."""
    return f"{height}x{width}"


def _parse_size(text: str) -> tuple[int, int]:
    height, width = text.split("x")
    return int(height), int(width)


# --- the manifest ----------------------------------------------------------------------------------


def load_manifest(out: str | Path) -> dict:
    """Read ``out/manifest.json``; a missing or unreadable one is a DataError."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "no manifest: not a finished `affectfast pack` output") from None
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(path, f"unreadable manifest: {error}") from None
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if found != FORMAT_VERSION:
        older = isinstance(found, int) and found < FORMAT_VERSION
        advice = (
            "packed by an older affectfast: run `affectfast pack` again into a new folder"
            if older
            else "not a pack this affectfast can read"
        )
        raise DataError(path, f"format_version {found!r}, expected {FORMAT_VERSION}: {advice}")
    return manifest


def check_stats(manifest: dict, path: Path) -> None:
    """The per-task counts the trainer takes loss weights from must be sane: counts non-negative
    integers of the right length that add up, VA mean and std finite (std >= 0). A DataError
    names manifest.json and the first bad entry. (verify compares them with the shards instead.)"""
    splits = manifest.get("splits")
    for split, entry in splits.items() if isinstance(splits, dict) else ():
        stats = entry.get("stats", {}) if isinstance(entry, dict) else None
        for task in TASKS if isinstance(stats, dict) else ("",):
            if stats is None or (task in stats and not _sane_stat(task, stats[task])):
                shown = f"{stats and stats.get(task)!r:.120}"
                raise DataError(
                    path,
                    f"splits.{split}.stats.{task} is not sane ({shown}): counts must be "
                    "non-negative integers of the right length, VA mean/std finite; re-run pack",
                )


def _is_count(value, limit: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _is_pair(values, low: float = -math.inf) -> bool:
    return (
        isinstance(values, list)
        and len(values) == 2
        and all(isinstance(v, (int, float)) and low <= v < math.inf for v in values)
    )


def _sane_stat(task: str, stat) -> bool:
    """One task's entry of a split's ``stats`` (docs/shard-format.md)."""
    if not isinstance(stat, dict) or not _is_count(stat.get("valid")):
        return False
    if task == "va":
        return _is_pair(stat.get("mean")) and _is_pair(stat.get("std"), low=0)
    key, size = ("class_counts", NUM_EXPR) if task == "expr" else ("positive_counts", NUM_AU)
    values = stat.get(key)
    return (
        isinstance(values, list)
        and len(values) == size
        and all(_is_count(v, stat["valid"]) for v in values)
        and (task == "au" or sum(values) == stat["valid"])  # every valid EXPR label has a class
    )


def manifest_summary(manifest: dict) -> str:
    """One line on a pack: shard count, samples per split, bad images skipped at pack time."""
    splits = manifest["splits"]
    shards = sum(len(entry["shards"]) for entry in splits.values())
    parts = ", ".join(f"{split} {entry['samples']}" for split, entry in splits.items())
    bad = sum(len(entry["bad_files"]) for entry in splits.values())
    skipped = f"; {bad} bad images skipped at pack time (listed in {MANIFEST})" if bad else ""
    return f"{shards} shards, samples {parts}{skipped}"
