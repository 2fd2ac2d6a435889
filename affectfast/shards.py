"""The shard format in code: names, tar members, DALI ``.idx`` files and the manifest.

The contract between ``pack`` (the writer) and every reader (verify, the loaders, train, evaluate,
predict, the benchmarks) is ``docs/shard-format.md``; this module is its code, and the only module
a reader of shards imports to understand them:

- names: ``<split>-NNNNNN.tar`` + ``.idx`` beside it, ``manifest.json``;
- tar members: GNU headers with fixed metadata (byte-identical packs), written here for the writer;
- ``.idx``: DALI's ``wds2idx`` ``v1.2`` text index, encoded here for the writer (DALI parses it);
- a split's shards for the readers (:class:`Shard`, ``split_shards``, ``sample_counts``,
  ``frame_sizes``): from the manifest, in O(shards) time and memory;
- files a manifest or a stamp names: ``check_file_name`` (a plain shard file name, never a path)
  and ``open_listed`` / ``stat_listed`` (a regular file of the pack folder, never through a link);
- the manifest: ``load_manifest`` (read and checked against the format, :func:`check_manifest`)
  and its one-line ``manifest_summary``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from affectfast.errors import DataError
from affectfast.safe_files import check_regular, excerpt, open_regular, read_bytes
from affectfast.tasks import NUM_AU, NUM_EXPR, SPLITS, TASKS, split_member

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


# The only files a manifest (or a staged copy's stamp) may name: <split>-NNNNNN.tar / .idx, plain
# names in the pack folder. Never a path: "/abs", "../x" or "a/b" would make a reader, verify or
# stage read, write or delete files outside the folders they were given.
SHARD_FILE = re.compile(rf"(?:{'|'.join(SPLITS)})-[0-9]{{6,}}\.(?:tar|idx)")


def check_file_name(name) -> bool:
    """True for a name a manifest or stamp may list: ``<split>-NNNNNN.tar`` or ``.idx``."""
    return isinstance(name, str) and SHARD_FILE.fullmatch(name) is not None


def open_listed(path: Path) -> BinaryIO:
    """Open (binary, read) a file that a manifest or stamp lists: it must be a regular file, and
    is never opened through a symbolic link (so never outside its folder) nor blocks (a FIFO)."""
    return os.fdopen(open_regular(path, follow_links=False, what="file the manifest lists"), "rb")


def stat_listed(path: Path) -> os.stat_result:
    """``lstat`` of a file a manifest or stamp lists; a DataError unless it is a regular file
    (a symbolic link is refused, not followed). A missing file raises the OSError."""
    return check_regular(path, follow_links=False)


def regular_size(path: Path) -> int | None:
    """The size of ``path`` if it is a regular file (links not followed), else None."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


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

    One ``lstat`` per file and the first line of each ``.idx``: a tar that is not a regular file
    of the folder, whose size differs from the manifest's (truncated, or another file) or an
    index whose sample count differs (another shard's) is a DataError naming it here, rather
    than a failure deep inside DALI's reader or mid-epoch in webdataset. ``affectfast verify``
    checks every byte.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(shards)
    entries = split_entry(load_manifest(folder), split, folder)["shards"]
    if not entries:
        raise DataError(folder / MANIFEST, f"lists no {split} shards")
    return [_checked_shard(folder, entry) for entry in entries]


def split_entry(manifest: dict, split: str, folder: Path) -> dict:
    """The manifest's entry of ``split``; a DataError naming the manifest when the pack has none."""
    entry = manifest["splits"].get(split)
    if entry is None:
        advice = ": pack the tree with --test-videos" if split == "test" else ""
        raise DataError(folder / MANIFEST, f"has no {split} split{advice}")
    return entry


def _checked_shard(folder: Path, entry: dict) -> Shard:
    tar, idx = folder / entry["name"], folder / entry["index"]
    try:
        size = stat_listed(tar).st_size
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
        with open_listed(idx) as f:
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
        raise DataError(idx, f"member {excerpt(name)} is not a sample's: {KEY_RULE}", 2)
    return int(header[1]), (name, int(first[1]))


def check_index_matches(tar: Path, idx: Path, name: str, offset: int) -> None:
    """The tar header just before the first sample's data must name it: a swapped, stale or
    foreign ``.idx`` is a DataError here, before DALI reads wrong offsets (one 512-byte read)."""
    start = offset - tarfile.BLOCKSIZE
    try:
        with open_listed(tar) as file:
            file.seek(max(start, 0))
            header = file.read(tarfile.BLOCKSIZE)
    except OSError as error:
        raise DataError(tar, f"cannot read the shard: {error.strerror}") from None
    found = header[:100].split(b"\0", 1)[0].decode("ascii", errors="replace")
    if start < 0 or found != name:
        raise DataError(
            idx,
            f"does not match {tar.name}: its first member {name} is {excerpt(found)} there (a "
            "swapped or stale index); run affectfast verify",
        )


def sample_counts(shards: list[Shard], tasks: tuple[str, ...]) -> np.ndarray:
    """Samples per shard that a loader of ``tasks`` yields (before splitting across ranks)."""
    return np.array([s.count(tasks) for s in shards], dtype=np.int64)


def frame_sizes(shards: str | Path, split: str) -> dict[tuple[int, int], int]:
    """(height, width) -> frames of that size in ``split``, from the manifest."""
    folder = Path(shards)
    sizes = split_entry(load_manifest(folder), split, folder)["frame_sizes"]
    return {_parse_size(text): count for text, count in sizes.items()}


def size_text(height: int, width: int) -> str:
    """``"112x112"``: how the manifest writes a frame size (height x width)."""
    return f"{height}x{width}"


_SIZE_TEXT = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


def _parse_size(text: str) -> tuple[int, int]:
    height, width = _SIZE_TEXT.fullmatch(text).groups()
    return int(height), int(width)


# --- the manifest ----------------------------------------------------------------------------------

MAX_MANIFEST_BYTES = 1 << 30  # a manifest listing 2.8M skipped images is under half of this
# Bounds past which a manifest's numbers are absurd rather than large: a shard of 1 TiB, a split
# of 10^9 frames (350 times Aff-Wild2), a video of more frames than 5-digit frame numbers name.
MAX_SHARD_BYTES = 1 << 40
MAX_SAMPLES = 10**9
MAX_FRAME_COUNT = 10**5 - 1
# Every sample takes at least two 512-byte tar blocks (a header and its image's data).
MIN_SAMPLE_BYTES = 2 * tarfile.BLOCKSIZE
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ADVICE = "; pack again, or restore the manifest pack wrote"


def load_manifest(out: str | Path) -> dict:
    """Read ``out/manifest.json`` and check it (:func:`check_manifest`); a missing, unreadable or
    malformed one is a DataError naming it (and the first field that is wrong)."""
    return read_manifest(out)[1]


def read_manifest(out: str | Path) -> tuple[bytes, dict]:
    """(the bytes of ``out/manifest.json``, the manifest they hold): :func:`load_manifest` for a
    caller that copies or hashes the very bytes it checked."""
    path = Path(out) / MANIFEST
    try:
        data = read_bytes(path, limit=MAX_MANIFEST_BYTES, follow_links=False, what="manifest")
    except FileNotFoundError:
        raise DataError(path, "no manifest: not a finished `affectfast pack` output") from None
    except OSError as error:
        raise DataError(path, f"unreadable manifest: {error.strerror or error}") from None
    return data, _parse_manifest(data, path)


def _parse_manifest(data: bytes, path: Path) -> dict:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(path, f"unreadable manifest: {excerpt(str(error))}") from None
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if found != FORMAT_VERSION:
        older = isinstance(found, int) and found < FORMAT_VERSION
        advice = (
            "packed by an older affectfast: run `affectfast pack` again into a new folder"
            if older
            else "not a pack this affectfast can read"
        )
        raise DataError(
            path, f"format_version {excerpt(found)}, expected {FORMAT_VERSION}: {advice}"
        )
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict, path: Path) -> None:
    """Everything a reader takes from a manifest must have the type and range the format gives
    it (docs/shard-format.md), so no command meets a KeyError, a TypeError or an absurd count
    later: one DataError naming ``path`` and the first field that is wrong. O(shards + videos).

    Checked: per split ``samples``, ``videos``, ``shards`` (file names by :func:`check_file_name`,
    each named once; ``samples``, ``bytes``, ``jpeg_bytes`` and ``counts`` non-negative integers
    bounded by each other), ``frame_sizes``, ``stats`` (:func:`check_stats`), ``bad_files`` and a
    test split's ``lists``; ``frame_counts`` and ``ignored_files`` where present.
    """
    check = _Checker(path)
    splits = check.mapping(check.field(manifest, "splits", ""), "splits")
    seen: set[str] = set()
    for split, entry in splits.items():
        where = f"splits.{split}"
        if split not in SPLITS:
            check.fail("splits", split, f"a split of {', '.join(SPLITS)}")
        check.mapping(entry, where)
        check.count(check.field(entry, "samples", where), f"{where}.samples", MAX_SAMPLES)
        check.count(check.field(entry, "videos", where), f"{where}.videos", MAX_SAMPLES)
        shards = check.field(entry, "shards", where)
        if not isinstance(shards, list):
            check.fail(f"{where}.shards", shards, "a list of shards")
        for number, shard in enumerate(shards):
            _check_shard_entry(check, split, shard, f"{where}.shards[{number}]", seen)
        sizes = check.mapping(check.field(entry, "frame_sizes", where), f"{where}.frame_sizes")
        for text, count in sizes.items():
            if _SIZE_TEXT.fullmatch(text) is None:
                check.fail(f"{where}.frame_sizes", text, "a frame size HEIGHTxWIDTH")
            check.count(count, f"{where}.frame_sizes.{text}", MAX_SAMPLES)
        bad = check.field(entry, "bad_files", where)
        if not isinstance(bad, list) or not all(
            isinstance(item, dict) and all(isinstance(item.get(k), str) for k in _BAD_FILE)
            for item in bad
        ):
            check.fail(f"{where}.bad_files", bad, f"a list of {{{', '.join(_BAD_FILE)}}}")
        if "lists" in entry:
            lists = check.mapping(entry["lists"], f"{where}.lists")
            for task, names in lists.items():
                if task not in TASKS or not isinstance(names, list):
                    check.fail(f"{where}.lists", {task: names}, "a list of videos per task")
                for name in names:
                    check.video(name, f"{where}.lists.{task}")
    check_stats(manifest, path)
    for field, limit in (("frame_counts", MAX_FRAME_COUNT), ("ignored_files", MAX_SAMPLES)):
        for video, count in check.mapping(manifest.get(field, {}), field).items():
            check.video(video, field)
            check.count(count, f"{field}.{video}", limit, low=1)
    source = manifest.get("source", {})
    if not isinstance(source, dict) or not isinstance(source.get("fingerprint", ""), str):
        check.fail("source", source, "{fingerprint, ...}")


_BAD_FILE = ("key", "path", "error")
_SHARD_INTEGERS = ("samples", "bytes", "jpeg_bytes")


def _check_shard_entry(check: _Checker, split: str, shard, where: str, seen: set[str]) -> None:
    """One entry of a split's ``shards``: names of this split's files, sizes that fit together."""
    check.mapping(shard, where)
    for key in ("name", "index"):
        name = check.field(shard, key, where)
        suffix = ".tar" if key == "name" else ".idx"
        if not (check_file_name(name) and name.startswith(f"{split}-") and name.endswith(suffix)):
            check.fail(f"{where}.{key}", name, f"a file name {split}-NNNNNN{suffix} (no path)")
        if name in seen:
            check.fail(f"{where}.{key}", name, "a file no other shard names")
        seen.add(name)
    if shard["index"][:-4] != shard["name"][:-4]:
        check.fail(f"{where}.index", shard["index"], f"the index of {shard['name']}")
    size = check.count(check.field(shard, "bytes", where), f"{where}.bytes", MAX_SHARD_BYTES)
    samples = check.count(
        check.field(shard, "samples", where),
        f"{where}.samples",
        size // MIN_SAMPLE_BYTES,
        f" (a sample takes at least {MIN_SAMPLE_BYTES} of the shard's {size} bytes)",
    )
    check.count(check.field(shard, "jpeg_bytes", where), f"{where}.jpeg_bytes", size, " (bytes)")
    sha = check.field(shard, "sha256", where)
    if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
        check.fail(f"{where}.sha256", sha, "64 lower-case hex digits")
    counts = check.mapping(check.field(shard, "counts", where), f"{where}.counts")
    for task in TASKS:
        check.count(
            check.field(counts, task, f"{where}.counts"),
            f"{where}.counts.{task}",
            samples,
            " (the shard's samples)",
        )


class _Checker:
    """Field checks that end in one DataError naming the manifest (or stamp) and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, value, expected: str):
        raise DataError(self.path, f"{where} is {excerpt(value)}: expected {expected}{_ADVICE}")

    def field(self, container: dict, key: str, where: str):
        if key not in container:
            raise DataError(self.path, f"{where or 'the manifest'} has no {key!r}{_ADVICE}")
        return container[key]

    def mapping(self, value, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, value, "a JSON object")
        return value

    def count(self, value, where: str, limit: int, why: str = "", low: int = 0) -> int:
        if not _is_count(value, limit) or value < low:
            self.fail(where, value, f"an integer in {low}..{limit:,}{why}")
        return value

    def video(self, name, where: str) -> None:
        if not isinstance(name, str) or not check_key(f"{name}/00001"):
            self.fail(where, name, "a video name (printable ASCII, no '.', '/', ':' or space)")


def check_stats(manifest: dict, path: Path) -> None:
    """The per-task counts the trainer takes loss weights from must be sane: counts non-negative
    integers of the right length that add up, VA mean and std finite (std >= 0). A DataError
    names manifest.json and the first bad entry. (verify compares them with the shards instead.)"""
    splits = manifest.get("splits")
    for split, entry in splits.items() if isinstance(splits, dict) else ():
        stats = entry.get("stats") if isinstance(entry, dict) else None
        for task in TASKS:
            stat_ = stats.get(task) if isinstance(stats, dict) else None
            if not _sane_stat(task, stat_):
                raise DataError(
                    path,
                    f"splits.{split}.stats.{task} is not sane ({excerpt(stat_)}): counts must be "
                    "non-negative integers of the right length, VA mean/std finite; re-run pack",
                )


def _is_count(value, limit: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _is_pair(values, low: float = -math.inf) -> bool:
    return (
        isinstance(values, list)
        and len(values) == 2
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v < math.inf
            for v in values
        )
    )


def _sane_stat(task: str, stat) -> bool:
    """One task's entry of a split's ``stats`` (docs/shard-format.md)."""
    if not isinstance(stat, dict) or not _is_count(stat.get("valid"), MAX_SAMPLES):
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
