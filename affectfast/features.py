"""A feature folder: every frame's pooled trunk features, per split, as memory-mappable arrays.

``affectfast extract`` writes one; ``affectfast train-temporal``, ``evaluate`` and ``predict`` read
it (docs/temporal.md). The layout::

    FEATURES/features.json          what it came from (frame checkpoint, pack) and what it holds
    FEATURES/<split>/features.npy   (R, D) float16: a row per frame with an image, video/frame order
    FEATURES/<split>/frames.npy     (R,) int32: each row's frame number (1-based)
    FEATURES/<split>/videos.csv     video,first_row,rows,frames: each video's rows and frame count N
    FEATURES/<split>/labels_<task>.npy, masks_<task>.npy
                                    the split's labels where it has them (as in affectfast.batch)

Plain ``.npy`` files: numpy maps them (``mmap_mode="r"``) so a 2.9 GB train split costs no
memory until rows are read, any tool opens them, and each is one contiguous array (no
per-record parsing, unlike a tar or a pickle). Rows are only the frames that have an image; the
frames without one are the gaps of ``frames.npy`` inside 1..N, and the temporal stage fills them
from the nearest frame with a flag (:mod:`affectfast.sequence`).

``features.json`` is written last, after every array: a folder without it is half-written and
refused. It names the frame checkpoint (path and sha256) and the pack (path and the sha256 of its
``manifest.json``), so features from another checkpoint or another pack are refused where it
matters (:func:`check_source`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from affectfast.errors import DataError
from affectfast.safe_files import excerpt, read_text
from affectfast.shards import read_manifest
from affectfast.tasks import NUM_AU, TASKS

FEATURES_MANIFEST = "features.json"
FEATURES_KIND = "affectfast-features"
FEATURES_VERSION = 1
FEATURE_DTYPE = np.float16
VIDEOS_HEADER = ("video", "first_row", "rows", "frames")
MANIFEST_LIMIT = 1 << 20  # bytes: a few hundred bytes per split
VIDEOS_LIMIT = 64 << 20  # bytes: a line per video
# Per task: the shape of one row's label after the row axis, and its dtype (as affectfast.batch).
LABEL_SHAPES: dict[str, tuple[tuple[int, ...], type]] = {
    "va": ((2,), np.float32),
    "expr": ((), np.int64),
    "au": ((NUM_AU,), np.float32),
}


@dataclass(frozen=True)
class VideoSpan:
    """One video of a split: its rows ``first_row .. first_row + rows - 1`` and its frame count N."""

    name: str
    first_row: int
    rows: int
    frames: int  # N: frames 1..N (the annotation lines, else the last frame with an image)

    @property
    def row_slice(self) -> slice:
        return slice(self.first_row, self.first_row + self.rows)


@dataclass
class FeatureSplit:
    """One split of a feature folder, its arrays memory-mapped (read-only)."""

    folder: Path
    split: str
    features: np.ndarray  # (R, D) float16
    frames: np.ndarray  # (R,) int32
    videos: list[VideoSpan]
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # only the labelled tasks
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def keys(self) -> list[str]:
        """Each row's sample key ``<video>/<NNNNN>``, as the shards and Predictions name frames."""
        return [
            f"{video.name}/{int(frame):05d}"
            for video in self.videos
            for frame in self.frames[video.row_slice]
        ]


def split_dir(folder: str | Path, split: str) -> Path:
    return Path(folder) / split


def write_split(
    folder: str | Path,
    split: str,
    features: np.ndarray,
    frames: np.ndarray,
    videos: list[VideoSpan],
    labels: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
) -> None:
    """Write one split's arrays and table (``features`` may already be ``folder/<split>/
    features.npy`` opened with ``np.lib.format.open_memmap``; it is then flushed, not copied)."""
    out = split_dir(folder, split)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "features.npy"
    if isinstance(features, np.memmap) and Path(features.filename) == target.resolve():
        features.flush()
    else:
        np.save(target, np.asarray(features, dtype=FEATURE_DTYPE))
    np.save(out / "frames.npy", np.asarray(frames, dtype=np.int32))
    for task in labels:
        shape, dtype = LABEL_SHAPES[task]
        np.save(out / f"labels_{task}.npy", np.asarray(labels[task], dtype=dtype))
        np.save(out / f"masks_{task}.npy", np.asarray(masks[task], dtype=bool))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(VIDEOS_HEADER)
    writer.writerows((v.name, v.first_row, v.rows, v.frames) for v in videos)
    (out / "videos.csv").write_text(text.getvalue())


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Write ``features.json`` (last: its presence says every array is complete)."""
    body = {"format": FEATURES_KIND, "version": FEATURES_VERSION, **manifest}
    (Path(folder) / FEATURES_MANIFEST).write_text(json.dumps(body, indent=2) + "\n")


def load_manifest(folder: str | Path) -> dict:
    """``features.json`` of a feature folder, checked; a missing one (not a feature folder, or
    one an interrupted extract left) and a malformed one are DataErrors naming it."""
    path = Path(folder) / FEATURES_MANIFEST
    if not Path(folder).is_dir():
        raise DataError(folder, "feature folder not found (make one with `affectfast extract`)")
    if not (path.exists() or path.is_symlink()):
        raise DataError(
            path,
            "not a finished feature folder (no features.json: extract writes it last, so the "
            "folder is half-written or not from `affectfast extract`); run extract again",
        )
    try:
        manifest = json.loads(read_text(path, limit=MANIFEST_LIMIT, what="feature manifest"))
    except json.JSONDecodeError as error:
        raise DataError(path, f"not JSON: {error.msg}", error.lineno) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FEATURES_KIND:
        raise DataError(path, f"not an affectfast feature manifest (format {FEATURES_KIND!r})")
    if manifest.get("version") != FEATURES_VERSION:
        raise DataError(
            path,
            f"feature format version {excerpt(manifest.get('version'))}, this affectfast reads "
            f"{FEATURES_VERSION}: run extract again",
        )
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    dim = manifest.get("feature_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise DataError(path, "feature_dim: expected a positive integer")
    for name in ("checkpoint", "pack"):
        entry = manifest.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise DataError(path, f"{name}: expected an object with a sha256")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DataError(path, "splits: expected an object naming at least one split")
    for split, entry in splits.items():
        labelled = entry.get("labelled") if isinstance(entry, dict) else None
        rows = entry.get("rows") if isinstance(entry, dict) else None
        fine = (
            isinstance(labelled, list)
            and all(t in TASKS for t in labelled)
            and isinstance(rows, int)
            and rows >= 0
        )
        if not fine:
            raise DataError(path, f"splits.{excerpt(split)}: expected rows and labelled tasks")


def pack_sha256(shards: str | Path) -> str:
    """The sha256 of a pack's ``manifest.json`` bytes (checked): what names the pack features
    were extracted from (the manifest lists every shard with its size, so a repack changes it)."""
    return hashlib.sha256(read_manifest(shards)[0]).hexdigest()


def check_source(
    folder: str | Path,
    manifest: dict,
    *,
    checkpoint_sha256: str | None = None,
    pack_sha256: str | None = None,
) -> None:
    """Refuse a feature folder made from another frame checkpoint or another pack than given."""
    path = Path(folder) / FEATURES_MANIFEST
    if checkpoint_sha256 is not None and manifest["checkpoint"]["sha256"] != checkpoint_sha256:
        raise DataError(
            path,
            f"these features come from another frame checkpoint "
            f"({excerpt(manifest['checkpoint'].get('path'))}, sha256 "
            f"{manifest['checkpoint']['sha256'][:12]}…), not the one given: extract them again",
        )
    if pack_sha256 is not None and manifest["pack"]["sha256"] != pack_sha256:
        raise DataError(
            path,
            f"these features come from another pack ({excerpt(manifest['pack'].get('path'))}): "
            "extract them again from these shards",
        )


def load_split(folder: str | Path, split: str, manifest: dict | None = None) -> FeatureSplit:
    """One split of a feature folder, memory-mapped and checked (shapes agree, the table covers
    every row once, in order); a split the folder lacks is a DataError naming the ones it has."""
    folder = Path(folder)
    manifest = manifest or load_manifest(folder)
    if split not in manifest["splits"]:
        raise DataError(
            folder / FEATURES_MANIFEST,
            f"no {split} split in these features (they hold {','.join(manifest['splits'])}); "
            f"run extract with --split {split}",
        )
    entry = manifest["splits"][split]
    out = split_dir(folder, split)
    features = _load_array(out / "features.npy")
    rows = entry["rows"]
    if features.ndim != 2 or features.shape != (rows, manifest["feature_dim"]):
        raise DataError(
            out / "features.npy",
            f"expected ({rows}, {manifest['feature_dim']}) features, found {features.shape}",
        )
    frames = _load_array(out / "frames.npy", (rows,))
    videos = read_videos(out / "videos.csv", rows)
    labels, masks = {}, {}
    for task in entry["labelled"]:
        shape, _ = LABEL_SHAPES[task]
        labels[task] = _load_array(out / f"labels_{task}.npy", (rows, *shape))
        masks[task] = _load_array(out / f"masks_{task}.npy", (rows,))
    return FeatureSplit(folder, split, features, frames, videos, labels, masks)


def _load_array(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(path, "missing from the feature folder: run extract again") from None
    except (ValueError, OSError) as error:
        raise DataError(path, f"not a readable .npy array ({error})") from None
    if shape is not None and array.shape != shape:
        raise DataError(path, f"expected shape {shape}, found {array.shape}")
    return array


def read_videos(path: Path, rows: int) -> list[VideoSpan]:
    """The table of videos, checked to cover rows 0..rows-1 once, in order."""
    text = read_text(path, limit=VIDEOS_LIMIT, what="video table")
    lines = list(csv.reader(text.splitlines()))
    if not lines or tuple(lines[0]) != VIDEOS_HEADER:
        raise DataError(path, f"expected the header {','.join(VIDEOS_HEADER)}", 1)
    videos, next_row = [], 0
    for number, line in enumerate(lines[1:], start=2):
        try:
            name, first, count, frames = line[0], *map(int, line[1:])
            if len(line) != 4 or first != next_row or count < 1 or frames < 1:
                raise ValueError
        except ValueError:
            raise DataError(
                path, f"expected video,first_row,rows,frames continuing row {next_row}", number
            ) from None
        videos.append(VideoSpan(name, first, count, frames))
        next_row += count
    if next_row != rows:
        raise DataError(path, f"the videos cover {next_row} rows, the features have {rows}")
    return videos
