"""Check a pack output folder against its manifest: sizes, checksums, indexes, counts, decodes.

``verify(out)`` reads every shard once: its size and sha256 must match the manifest, its ``.idx``
must equal the index rebuilt from the tar's own headers, and the samples, label components, label
statistics and frame sizes (from each JPEG's frame header) it holds must add up to what the
manifest says. With ``decode=True`` every image is also fully decoded. Files are read as the
manifest names them and only so (``shards.open_listed``: regular files of the folder, never
through a link). It returns the problems found, one line each; an empty list means all is well.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from affectfast.errors import DataError
from affectfast.jpeg import JpegError, check_jpeg
from affectfast.safe_files import excerpt, read_bytes, read_text
from affectfast.shards import (
    KEY_RULE,
    MANIFEST,
    check_key,
    index_line,
    index_text,
    load_manifest,
    manifest_summary,
    open_listed,
    size_text,
)
from affectfast.tasks import (
    IMAGE_EXT,
    LABEL_EXT,
    NUM_AU,
    NUM_EXPR,
    TASKS,
    decode_label,
    labels_in_range,
    split_member,
)

TASK_OF_EXT = {ext: task for task, ext in LABEL_EXT.items()}
# VA mean/std come from running sums here, from arrays in pack: allow float64 rounding only.
STATS_TOLERANCE = 1e-6


@dataclass
class ShardCounts:
    """What one shard (or a whole split) holds, counted from the tar itself."""

    samples: int = 0
    valid: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASKS, 0))
    expr: np.ndarray = field(default_factory=lambda: np.zeros(NUM_EXPR, dtype=np.int64))
    au: np.ndarray = field(default_factory=lambda: np.zeros(NUM_AU, dtype=np.int64))
    va_sum: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float64))
    va_squares: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float64))
    frame_sizes: dict[str, int] = field(default_factory=dict)  # "HxW" -> images of that size

    def add(self, other: ShardCounts) -> None:
        self.samples += other.samples
        for text, count in other.frame_sizes.items():
            self.frame_sizes[text] = self.frame_sizes.get(text, 0) + count
        for task in TASKS:
            self.valid[task] += other.valid[task]
        self.expr += other.expr
        self.au += other.au
        self.va_sum += other.va_sum
        self.va_squares += other.va_squares


def verify(
    out: str | Path, decode: bool = False, *, workers: int = 1, progress: bool = False
) -> list[str]:
    """Every problem found in the pack output ``out`` (one line each); empty when all is well."""
    out = Path(out)
    try:
        manifest = load_manifest(out)
    except DataError as error:
        return [str(error)]
    problems = []
    shards = [
        (split, shard) for split, entry in manifest["splits"].items() for shard in entry["shards"]
    ]
    totals = {split: ShardCounts() for split in manifest["splits"]}
    jobs = [(out, shard, decode) for _, shard in shards]
    for (split, _), (found, counts) in zip(
        shards,
        tqdm(
            _map(_check_shard, jobs, workers),
            total=len(jobs),
            unit="shard",
            desc="verifying",
            disable=not progress,
        ),
    ):
        problems += found
        if counts is not None:
            totals[split].add(counts)
    for split, entry in manifest["splits"].items():
        problems += _compare_split(out / MANIFEST, split, entry, totals[split])
    listed = {shard[key] for _, shard in shards for key in ("name", "index")}
    problems += [
        f"{path}: not listed in the manifest"
        for path in sorted(out.iterdir())
        if path.suffix in (".tar", ".idx") and path.name not in listed
    ]
    return problems


def _map(function, jobs: list, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(function, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(function, jobs)


def _check_shard(job: tuple[Path, dict, bool]) -> tuple[list[str], ShardCounts | None]:
    """Check one shard against its manifest entry and count what it holds."""
    out, shard, decode = job
    path = out / shard["name"]
    try:  # never more than the manifest's size: a larger file is not this shard anyway
        data = read_bytes(path, limit=shard["bytes"], follow_links=False, what="shard")
    except OSError as error:
        return [f"{path}: missing or unreadable ({error.strerror or error})"], None
    except DataError as error:
        return [str(error)], None
    problems = []
    if len(data) != shard["bytes"]:
        problems.append(f"{path}: {len(data)} bytes, the manifest says {shard['bytes']}")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest (changed or corrupt)")
    try:
        lines, counts = _read_tar(path, data, decode, problems)
    except tarfile.TarError as error:
        return problems + [f"{path}: not a readable tar ({error})"], None
    problems += _compare_index(out / shard["index"], index_text(lines))
    if counts.samples != shard["samples"]:
        problems.append(f"{path}: {counts.samples} samples, the manifest says {shard['samples']}")
    if counts.valid != shard["counts"]:
        problems.append(f"{path}: label counts {counts.valid}, the manifest says {shard['counts']}")
    return problems, counts


def _read_tar(
    path: Path, data: bytes, decode: bool, problems: list[str]
) -> tuple[list[str], ShardCounts]:
    """Group the members into samples as DALI's wds2idx does; count and check their components."""
    counts, lines, sample, last = ShardCounts(), [], [], None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                problems.append(f"{path}: member {excerpt(member.name)} is not a regular file")
                continue
            key, ext = split_member(member.name)
            if not check_key(key):
                problems.append(
                    f"{path}: member {excerpt(member.name)} is not a sample's: {KEY_RULE}"
                )
            if key != last and sample:
                lines.append(index_line(sample))
                sample = []
            last = key
            sample.append((member.name, member.offset_data, member.size))
            payload = data[member.offset_data : member.offset_data + member.size]
            _count_component(path, member.name, ext, payload, decode, counts, problems)
    if sample:
        lines.append(index_line(sample))
    counts.samples = len(lines)
    return lines, counts


def _count_component(
    path: Path,
    name: str,
    ext: str,
    payload: bytes,
    decode: bool,
    counts: ShardCounts,
    problems: list[str],
) -> None:
    if ext == IMAGE_EXT:
        try:
            text = size_text(*check_jpeg(payload, "full" if decode else "header"))
        except JpegError as error:
            problems.append(f"{path}: {excerpt(name)}: {error}")
            return
        counts.frame_sizes[text] = counts.frame_sizes.get(text, 0) + 1
        return
    task = TASK_OF_EXT.get(ext)
    if task is None:
        problems.append(f"{path}: {excerpt(name)}: unknown component {excerpt(ext)}")
        return
    try:
        label = decode_label(task, payload)
    except ValueError as error:
        problems.append(f"{path}: {excerpt(name)}: {error}")
        return
    if not labels_in_range(task, label[None]).all():
        problems.append(f"{path}: {excerpt(name)}: label {label.tolist()} out of range")
        return
    counts.valid[task] += 1
    if task == "expr":
        counts.expr[label[0]] += 1
    elif task == "au":
        counts.au += label == 1
    else:
        value = label.astype(np.float64)
        counts.va_sum += value
        counts.va_squares += value * value


def _compare_index(path: Path, expected: str) -> list[str]:
    try:  # twice the expected size is plenty to say where they differ, and bounds the read
        found = read_text(
            path, limit=2 * len(expected) + 4096, encoding="ascii", follow_links=False, what="index"
        )
    except OSError as error:
        return [f"{path}: missing or unreadable ({error.strerror or error})"]
    except DataError as error:
        return [str(error)]
    if found == expected:
        return []
    for number, (a, b) in enumerate(zip(found.splitlines(), expected.splitlines()), start=1):
        if a != b:
            return [f"{path}:{number}: does not match its tar (expected {b[:80]!r})"]
    return [
        f"{path}: does not match its tar ({len(found.splitlines())} lines, expected "
        f"{len(expected.splitlines())})"
    ]


def _compare_split(manifest: Path, split: str, entry: dict, counts: ShardCounts) -> list[str]:
    """The split's totals counted in the shards against the manifest's samples and stats."""
    problems = []
    where = f"{manifest}: {split}"
    if counts.samples != entry["samples"]:
        problems.append(
            f"{where}: shards hold {counts.samples} samples, the manifest says {entry['samples']}"
        )
    stats = entry["stats"]
    for task in TASKS:
        if counts.valid[task] != stats[task]["valid"]:
            problems.append(
                f"{where}: shards hold {counts.valid[task]} valid {task} labels, the "
                f"manifest says {stats[task]['valid']}"
            )
    if counts.expr.tolist() != stats["expr"]["class_counts"]:
        problems.append(
            f"{where}: expr class counts {counts.expr.tolist()} differ from the "
            f"manifest's {stats['expr']['class_counts']}"
        )
    if counts.au.tolist() != stats["au"]["positive_counts"]:
        problems.append(
            f"{where}: AU positive counts {counts.au.tolist()} differ from the "
            f"manifest's {stats['au']['positive_counts']}"
        )
    if counts.frame_sizes != entry["frame_sizes"]:
        problems.append(
            f"{where}: frame sizes {excerpt(dict(sorted(counts.frame_sizes.items())))} in the "
            f"JPEG headers, the manifest says {excerpt(entry['frame_sizes'])}"
        )
    n = max(counts.valid["va"], 1)
    mean = counts.va_sum / n
    std = np.sqrt(np.maximum(counts.va_squares / n - mean * mean, 0))
    for name, value in (("mean", mean), ("std", std)):
        if not np.allclose(value, stats["va"][name], rtol=0, atol=STATS_TOLERANCE):
            problems.append(
                f"{where}: VA {name} {value.tolist()} differs from the manifest's "
                f"{stats['va'][name]}"
            )
    return problems


def first_bad_label(
    out: str | Path, split: str, tasks: tuple[str, ...]
) -> tuple[Path, str, str] | None:
    """The first label component of ``tasks`` in ``split``'s shards (manifest order) that does not
    decode or is out of range: (tar, member name, what it holds); None when all are good.

    Reads the tars themselves (tarfile), not the .idx files: when every label is good, a batch's
    bad label came from an index that does not match its tar.
    """
    wanted = {LABEL_EXT[task]: task for task in tasks}
    for entry in load_manifest(out)["splits"][split]["shards"]:
        path = Path(out) / entry["name"]
        try:
            with open_listed(path) as file, tarfile.open(fileobj=file) as tar:
                for member in tar:
                    task = wanted.get(split_member(member.name)[1])
                    if task is None:
                        continue
                    data = tar.extractfile(member).read()
                    try:
                        label = decode_label(task, data)
                    except ValueError as error:
                        return path, member.name, str(error)
                    if not labels_in_range(task, label[None]).all():
                        return path, member.name, f"{task} label {label.tolist()}"
        except (OSError, tarfile.TarError, DataError) as error:
            return path, "", f"unreadable ({error})"
    return None


def summary(out: str | Path) -> str:
    """One line describing a verified pack output (from its manifest)."""
    return f"{out}: ok, {manifest_summary(load_manifest(out))}"
