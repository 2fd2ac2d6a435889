"""The shard format in code: names, tar members, DALI ``.idx`` files and the manifest.

The contract between ``pack`` (the writer) and every reader (verify, the loaders, train, evaluate,
predict, the benchmarks) is ``docs/shard-format.md``; this module is its code, and the only module
a reader of shards imports to understand them:

- names: ``<split>-NNNNNN.tar`` + ``.idx`` beside it, ``manifest.json``;
- tar members: GNU headers with fixed metadata (byte-identical packs), written here for the writer;
- ``.idx``: DALI's ``wds2idx`` ``v1.2`` text index, encoded here for the writer and parsed here into
  :class:`Shard` for the readers (``split_shards``, ``sample_counts``);
- the manifest: ``load_manifest`` and its one-line ``manifest_summary``.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from affectfast.errors import DataError
from affectfast.tasks import IMAGE_EXT, LABEL_EXT, NUM_AU, NUM_EXPR, SPLITS, TASKS, split_member

FORMAT_VERSION = 1
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


# --- .idx parsing (the readers' side) ------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One tar of a split and what its DALI index (.idx) says is inside."""

    tar: Path
    idx: Path
    keys: tuple[str, ...]  # sample keys in tar order
    components: tuple[frozenset, ...]  # extensions present per sample ("jpg", "va", ...)
    jpeg_bytes: int  # total size of the jpg members
    end: int  # byte offset just past the last member's data
    first_jpeg: tuple[int, int]  # (offset, size) of the first sample's jpg member

    def has(self, tasks: tuple[str, ...]) -> np.ndarray:
        """Bool per sample: the sample belongs to a loader of ``tasks`` (see module docstring)."""
        if len(tasks) > 1:
            return np.ones(len(self.keys), dtype=bool)
        ext = LABEL_EXT[tasks[0]]
        return np.array([ext in c for c in self.components], dtype=bool)


def read_index(tar: Path, idx: Path) -> Shard:
    """Parse a wds2idx ``v1.2`` index: one line per sample of ``ext offset size name`` groups."""
    try:
        lines = idx.read_text().splitlines()
    except OSError as error:
        raise DataError(idx, f"cannot read the shard index: {error.strerror}") from None
    header = lines[0].split() if lines else []
    if (
        len(header) != 2
        or not header[0].startswith("v1.")
        or not header[1].isdigit()
        or len(lines) - 1 != int(header[1])
    ):
        raise DataError(idx, "not a complete wds2idx index (header 'v1.2 N' and N sample lines)", 1)
    keys, components, jpeg_bytes, end, first_jpeg = [], [], 0, 0, (0, 0)
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise DataError(idx, "expected groups of 'ext offset size name'", number)
        groups = [fields[i : i + 4] for i in range(0, len(fields), 4)]
        name = groups[0][3]
        key, ext = split_member(name)
        if not ext or not all(g[1].isdigit() and g[2].isdigit() for g in groups):
            raise DataError(
                idx,
                "expected groups of 'ext offset size name' with integer offset "
                "and size and a name with an extension",
                number,
            )
        _check_index_names(idx, number, key, groups)
        keys.append(key)
        components.append(frozenset(g[0] for g in groups))
        for ext, offset, size, _ in groups:
            end = max(end, int(offset) + int(size))
            if ext == IMAGE_EXT:
                jpeg_bytes += int(size)
                first_jpeg = first_jpeg if jpeg_bytes > int(size) else (int(offset), int(size))
    return Shard(tar, idx, tuple(keys), tuple(components), jpeg_bytes, end, first_jpeg)


def _check_index_names(idx: Path, number: int, key: str, groups: list[list[str]]) -> None:
    """Every member of an index line is ``<key>.<ext>`` of one well-formed key."""
    for ext, _, _, name in groups:
        if not check_key(split_member(name)[0]):
            raise DataError(idx, f"member {name!r} is not a sample's: {KEY_RULE}", number)
        if split_member(name) != (key, ext):
            raise DataError(idx, f"member {name!r} is not {key}.{ext}: one sample per line", number)


def check_index_matches(shard: Shard) -> None:
    """The tar header just before the first sample's image must name it: a swapped, stale or
    foreign .idx is a DataError here, before DALI reads wrong offsets (one 512-byte read)."""
    if not shard.keys:
        return
    offset = shard.first_jpeg[0] - tarfile.BLOCKSIZE
    try:
        with open(shard.tar, "rb") as file:
            file.seek(max(offset, 0))
            header = file.read(tarfile.BLOCKSIZE)
    except OSError as error:
        raise DataError(shard.tar, f"cannot read the shard: {error.strerror}") from None
    name = header[:100].split(b"\0", 1)[0].decode("ascii", errors="replace")
    if offset < 0 or name != f"{shard.keys[0]}.{IMAGE_EXT}":
        raise DataError(
            shard.idx,
            f"does not match {shard.tar.name}: its first sample {shard.keys[0]} is {name!r} there "
            "(a swapped or stale index); run affectfast verify",
        )


@lru_cache(maxsize=64)
def _cached_index(tar: Path, idx: Path, stamp: tuple) -> Shard:
    shard = read_index(tar, idx)
    check_index_matches(shard)
    return shard


def split_shards(shards: str | Path, split: str) -> list[Shard]:
    """The shards of ``split`` in a pack folder, in order, checked against truncation.

    The shard list comes from ``manifest.json`` when present, and only from it (an empty list is
    a DataError); without a manifest, from the ``<split>-*.tar`` files.
    A tar shorter than its index says, or than the manifest's byte count, is a DataError naming it:
    DALI would otherwise fail deep inside its reader and webdataset mid-epoch.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(shards)
    listed = _manifest_shards(folder, split)
    if listed == {}:  # a manifest is the list: never stray tars that happen to match a glob
        raise DataError(
            folder / MANIFEST, f"lists no {split} shards: the {split} split has no samples"
        )
    tars = [folder / name for name in listed] if listed else sorted(folder.glob(f"{split}-*.tar"))
    if not tars:
        raise DataError(folder, f"no {split} shards ({split}-NNNNNN.tar) in this folder")
    result = []
    for tar in tars:
        idx = tar.with_suffix(".idx")
        if not tar.is_file():
            raise DataError(tar, "shard listed in manifest.json is missing")
        if not idx.is_file():
            raise DataError(idx, "shard index missing (pack writes it beside the tar)")
        stamp = (tar.stat().st_size, tar.stat().st_mtime_ns, idx.stat().st_mtime_ns)
        shard = _cached_index(tar, idx, stamp)
        expected = max(shard.end, (listed or {}).get(tar.name) or 0)
        if stamp[0] < expected:
            raise DataError(
                tar,
                f"truncated shard: {stamp[0]} bytes, but its index/manifest need "
                f"at least {expected}; re-run pack or copy it again",
            )
        result.append(shard)
    return result


def _manifest_shards(folder: Path, split: str) -> dict[str, int] | None:
    """Shard name -> byte count from manifest.json (docs/shard-format.md); None without one."""
    if not (folder / MANIFEST).is_file():
        return None
    manifest = load_manifest(folder)
    try:
        return {entry["name"]: int(entry["bytes"]) for entry in manifest["splits"][split]["shards"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(
            folder / MANIFEST,
            f"no shard list for split {split!r} ({type(error).__name__}: {error})",
        ) from None


def sample_counts(shards: list[Shard], tasks: tuple[str, ...]) -> np.ndarray:
    """Samples per shard that a loader of ``tasks`` yields (before splitting across ranks)."""
    return np.array([int(s.has(tasks).sum()) for s in shards], dtype=np.int64)


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            path, f"format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
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
