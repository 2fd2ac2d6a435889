"""Extract: one inference pass of a frame checkpoint over packed shards into a feature folder.

``extract(ExtractConfig)`` runs the checkpoint's ResNet-18 trunk (``model.trunk``: the pooled
512-d features its heads read) under the run's autocast over every frame of each split, and
writes the folder :mod:`affectfast.features` defines: per split ``features.npy`` (float16), the
frame numbers, the video table and the labels and masks of the tasks the split has labels for.

How the rows get to disk, at 2.8M frames (~2.9 GB of features) without holding them in memory:

1. each rank (one process, or each of a torchrun launch) writes its rows in loader order to a
   part of its own (raw float16 rows, the sample keys, labels and masks) in the staging folder;
2. after a barrier, rank 0 merges: the keys of every part sorted (video/frame order), padded or
   repeated samples kept once (the first, as ``metrics.Predictions.concat`` does), and the rows
   copied in chunks into ``features.npy`` opened with ``np.lib.format.open_memmap``.

So the folder does not depend on how many processes made it. Everything is written into a hidden
staging folder beside OUT (``.<name>.extract-staging``), ``features.json`` last, and renamed to
OUT only when complete: an error removes the staging folder, a kill leaves it (the next extract
into OUT removes it) and never a folder that looks finished.

A video's frame count N is the pack manifest's ``frame_counts`` (its annotation lines) where it
has one, else its last frame with an image. Images are never dropped: where an image lies past
the annotated N (a count shorter than the frame folder), N becomes that image's frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from affectfast.config import ExtractConfig, TrainConfig
from affectfast.dist import (
    DistInfo,
    gather_to_main,
    main_decides,
    setup_distributed,
    teardown_distributed,
)
from affectfast.errors import DataError, check_writable_folder
from affectfast.features import (
    FEATURE_DTYPE,
    FEATURES_MANIFEST,
    LABEL_SHAPES,
    VideoSpan,
    split_dir,
    write_manifest,
    write_split,
)
from affectfast.loaders import screen_labels
from affectfast.model import AffectNet
from affectfast.rundir import is_temporal, load_checkpoint
from affectfast.safe_files import excerpt, exclusive_lock
from affectfast.shards import MANIFEST, check_key, read_manifest
from affectfast.tasks import TASKS
from affectfast.train import (
    bad_label_error,
    build_autocast,
    build_eval_loader,
    progress,
    resolve_device,
    set_torch_threads,
)
from affectfast.tuned import Fingerprint

FEATURE_DIM = 512  # ResNet-18's pooled features (the trunk's fc is removed)
MERGE_ROWS = 1 << 16  # rows per copy in the merge: 64 MiB of 512-d float16
# Disk-full errnos: a one-line DataError naming OUT, the staging folder removed.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Extraction:
    """What :func:`extract` wrote: the folder, rows per split, and the inference time."""

    out: Path
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # the inference passes, every split (the merge not included)

    def summary(self) -> str:
        """One line: rows per split and images/s."""
        total = sum(self.rows.values())
        rate = total / self.seconds if self.seconds > 0 else 0.0
        splits = ", ".join(f"{split} {rows:,} rows" for split, rows in self.rows.items())
        return (
            f"extracted {FEATURE_DIM}-d float16 features into {self.out}: {splits} "
            f"({total:,} images at {rate:,.0f} images/s)"
        )


def extract_features(config: ExtractConfig) -> Path:
    """Write the feature folder ``config.out`` (every rank of a torchrun launch calls it) and
    return its path."""
    return extract(config).out


def extract(config: ExtractConfig) -> Extraction:
    """:func:`extract_features`, returning what was written (rows per split, seconds)."""
    checkpoint = load_frame_checkpoint(config.checkpoint)
    manifest_bytes, pack = read_manifest(config.shards)
    splits = resolve_splits(config, pack)
    run = TrainConfig.from_dict(checkpoint["config"])
    run = dataclasses.replace(
        run, shards=config.shards, loader=config.loader, num_threads=config.num_threads
    )
    run, use_cuda = resolve_device(run)
    info = setup_distributed(use_cuda)
    try:
        set_torch_threads(info)
        with contextlib.ExitStack() as held:  # the main rank's lock on OUT, for the whole run
            claim = functools.partial(_claim, config, manifest_bytes, held)
            staging, source = main_decides(claim, info)
            try:
                _check_shared(staging, config.out, info)
                return _extract_into(staging, config, checkpoint, run, pack, splits, info, source)
            except OSError as error:
                if error.errno in FULL_DISK:
                    raise DataError(
                        config.out,
                        f"the disk is full ({error.strerror}): free space or choose a folder "
                        "on another disk (nothing was left behind)",
                    ) from None
                raise
            finally:
                if info.is_main and staging.exists():
                    _remove_staging(staging)
    finally:
        teardown_distributed()


def load_frame_checkpoint(path: Path) -> dict:
    """A frame checkpoint (train's best.pt/last.pt) as ``rundir.load_checkpoint`` checks it; a
    temporal checkpoint is a one-line DataError."""
    checkpoint = load_checkpoint(path, temporal_ok=True)  # read once
    if is_temporal(checkpoint):
        raise DataError(
            path,
            "a temporal checkpoint; extract needs a frame checkpoint (train's best.pt/last.pt)",
        )
    return checkpoint


def resolve_splits(config: ExtractConfig, pack: dict) -> tuple[str, ...]:
    """The splits to extract: those given (each must be in the pack), else every split it has."""
    present = tuple(s for s in ("train", "val", "test") if s in pack["splits"])
    missing = [s for s in config.splits if s not in present]
    if missing:
        advice = ": pack the tree with --test-videos" if "test" in missing else ""
        raise DataError(
            config.shards / MANIFEST,
            f"no {','.join(missing)} split in this pack (it has {','.join(present)}){advice}",
        )
    return config.splits or present


# --- OUT and its staging folder --------------------------------------------------------------


def output_path(config: ExtractConfig) -> Path:
    """``config.out`` absolute and normalized: ``.`` and ``a/..`` name a folder with a parent to
    stage beside."""
    return Path(os.path.abspath(config.out))


def staging_path(out: Path) -> Path:
    """The hidden folder beside ``out`` that extract fills, then renames to ``out``."""
    return out.parent / f".{out.name}.extract-staging"


def _claim(
    config: ExtractConfig, manifest_bytes: bytes, held: contextlib.ExitStack
) -> tuple[Path, dict]:
    """On the main rank: lock OUT, check it is missing or empty, remove a killed extract's
    staging folder and create a new one. Returns its resolved path (``write_split`` compares
    the memmap's path) and the manifest's record of the sources (:func:`_source`)."""
    out = output_path(config)
    check_writable_folder(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DataError(out, "is a file or a link, not a folder: give --out a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(
            out,
            "is not empty: extract writes a new feature folder; give --out a new or empty "
            "folder, or delete this one first",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.extract.lock"
    held.enter_context(exclusive_lock(lock, on_busy=_refuse_busy(out), remove=True))
    staging = staging_path(out)
    if staging.exists() or staging.is_symlink():
        _remove_staging(staging)
    source = _source(config, manifest_bytes)
    staging.mkdir()
    return staging.resolve(), source


def _check_shared(staging: Path, out: Path, info: DistInfo) -> None:
    """Every rank must see the staging folder: ranks write their parts where rank 0 merges."""
    seen = gather_to_main(staging.is_dir(), info)

    def check() -> None:
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        if blind:
            raise DataError(
                out,
                f"rank {blind[0]} cannot see {staging}: extract with several nodes needs --out "
                "on a file system every node shares",
            )

    main_decides(check, info)


def _refuse_busy(out: Path):
    def refuse(holder: str) -> None:
        raise DataError(out, f"another extract (process {excerpt(holder)}) is writing it")

    return refuse


def _remove_staging(staging: Path) -> None:
    """Delete a staging folder extract made: only extract's own names in it, else a DataError
    (never delete what someone else put there)."""
    if staging.is_symlink() or not staging.is_dir():
        raise DataError(staging, "is not extract's staging folder: remove it by hand")
    for entry in staging.iterdir():
        ours = entry.name == FEATURES_MANIFEST or (
            entry.name in ("train", "val", "test")
            and entry.is_dir()
            and not entry.is_symlink()
            and all(p.is_file() and _is_our_file(p.name) for p in entry.iterdir())
        )
        if not ours:
            raise DataError(entry, "not written by extract: remove the staging folder by hand")
    shutil.rmtree(staging)


def _is_our_file(name: str) -> bool:
    return name.endswith((".npy", ".csv", ".bin"))


def _publish(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to OUT: an empty OUT is replaced, and one that a file
    was added to meanwhile stops it (ENOTEMPTY)."""
    try:
        os.rename(staging, out)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise DataError(
            out, "something was written into it during the extract: run again"
        ) from None


# --- the pass and the merge ------------------------------------------------------------------


def _extract_into(
    staging: Path,
    config: ExtractConfig,
    checkpoint: dict,
    run: TrainConfig,
    pack: dict,
    splits: tuple[str, ...],
    info: DistInfo,
    source: dict,
) -> Extraction:
    """Extract every split into ``staging``; on the main rank, write features.json and publish."""
    model = AffectNet(run.tasks)
    model.load_state_dict(checkpoint["model"])
    memory = torch.channels_last if run.channels_last else torch.preserve_format
    model = model.to(info.device, memory_format=memory).eval()
    autocast = build_autocast(info.device, run.amp)
    # Every task, so the loader reads every sample (a uni-task loader keeps its labelled ones)
    # and the features carry each label the pack has, whatever the frame model was trained on.
    reader = dataclasses.replace(run, tasks=TASKS)
    result = Extraction(config.out)
    entries = {}
    for split in splits:
        loader = build_eval_loader(reader, config.shards, split, info, config.batch_size)
        start = time.perf_counter()
        part = _write_part(model, loader, autocast, staging / split, info)
        gathered = gather_to_main((*part, time.perf_counter() - start), info)
        finish = functools.partial(_finish_split, gathered, staging, split, pack, config, info)
        entries[split] = main_decides(finish, info)
        result.rows[split] = entries[split]["rows"]
        result.seconds += entries[split].pop("seconds", 0.0) if info.is_main else 0.0
    if info.is_main:
        write_manifest(staging, {**source, **_holds(run, entries)})
        _publish(staging, output_path(config))
    return result


def _finish_split(
    gathered: list, staging: Path, split: str, pack: dict, config: ExtractConfig, info: DistInfo
) -> dict:
    """On the main rank, once every rank wrote its part: refuse what a rank found wrong, merge.
    The split's manifest entry, with the slowest rank's seconds (taken out before it is saved)."""
    if any(bad_labels for _, bad_labels, _, _ in gathered):
        raise bad_label_error(config.shards, split, TASKS)
    if any(bad_features for _, _, bad_features, _ in gathered):
        raise DataError(
            config.checkpoint,
            f"its trunk gave features that are not finite in float16 on the {split} split "
            "(beyond ±65504, or NaN): this checkpoint cannot be extracted",
        )
    labelled = labelled_tasks(pack, split)
    entry = merge_parts(staging, split, info.world_size, labelled, pack, config.shards)
    return {**entry, "seconds": max(seconds for *_, seconds in gathered)}


def labelled_tasks(pack: dict, split: str) -> list[str]:
    """The tasks whose labels the pack's shards carry for ``split`` (its stats count them)."""
    stats = pack["splits"][split]["stats"]
    return [t for t in TASKS if stats[t]["valid"] > 0]


@torch.inference_mode()
def _write_part(model, loader, autocast, folder: Path, info: DistInfo) -> tuple[int, bool, bool]:
    """Run the trunk over this rank's share of the split and write it, in loader order, as
    ``folder/part-<rank>.*``: the rows (raw float16), the keys, each task's labels and masks.
    Returns (rows written, whether a label was out of range, whether a feature is not finite)."""
    folder.mkdir(exist_ok=True)
    stem = folder / f"part-{info.rank}"
    keys, labels, masks = [], {t: [] for t in TASKS}, {t: [] for t in TASKS}
    faults = torch.zeros((), dtype=torch.bool, device=info.device)  # a label out of range
    overflow = torch.zeros((), dtype=torch.bool, device=info.device)  # no host sync per batch
    pending = None
    count = 0

    def flush(done) -> None:  # the previous batch: its copy waited while this one ran
        features, batch_labels, batch_masks = done
        rows.write(features.cpu().numpy().tobytes())
        for task in TASKS:
            labels[task].append(batch_labels[task].cpu().numpy())
            masks[task].append(batch_masks[task].cpu().numpy())

    with open(f"{stem}.features.bin", "wb") as rows:
        for batch in progress(loader, f"extract {loader.config.split}", info):
            faults |= screen_labels(batch.labels, batch.masks)
            with autocast():
                features = model.trunk(batch.images)
            features = features.to(torch.float16)
            overflow |= ~torch.isfinite(features).all()
            if pending is not None:
                flush(pending)
            # screen_labels put new tensors in these dicts: nothing the loader may reuse
            pending = (features, dict(batch.labels), dict(batch.masks))
            keys.append(np.array(batch.keys, dtype=np.bytes_))
            count += len(batch)
        if pending is not None:
            flush(pending)
    np.save(f"{stem}.keys.npy", np.concatenate(keys) if keys else np.array([], np.bytes_))
    for task in TASKS:
        shape, dtype = LABEL_SHAPES[task]
        np.save(f"{stem}.labels_{task}.npy", _joined(labels[task], shape, dtype))
        np.save(f"{stem}.masks_{task}.npy", _joined(masks[task], (), bool))
    return count, bool(faults), bool(overflow)


def _joined(arrays: list[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, *shape), dtype)


def merge_parts(
    staging: Path, split: str, parts: int, labelled: list[str], pack: dict, shards: Path
) -> dict:
    """Join the ranks' parts of ``split`` into its final arrays, in (video, frame) order with each
    key once, and delete the parts. Returns the manifest's entry for the split."""
    folder = split_dir(staging, split)
    stems = [folder / f"part-{rank}" for rank in range(parts)]
    keys = np.concatenate([np.load(f"{s}.keys.npy") for s in stems])
    if not len(keys):
        raise DataError(shards / MANIFEST, f"the {split} split has no image to extract")
    # np.unique sorts the keys (<video>/<NNNNN>: video, then frame) and gives each one's first row.
    unique, first = np.unique(keys, return_index=True)
    videos, frames = video_table(unique, pack.get("frame_counts", {}), shards)
    features = _merge_features(stems, first, folder / "features.npy")
    labels, masks = {}, {}
    for task in labelled:
        labels[task] = np.concatenate([np.load(f"{s}.labels_{task}.npy") for s in stems])[first]
        masks[task] = np.concatenate([np.load(f"{s}.masks_{task}.npy") for s in stems])[first]
    write_split(staging, split, features, frames, videos, labels, masks)
    del features  # unmapped before the parts go
    for stem in stems:
        for part in folder.glob(f"{stem.name}.*"):
            part.unlink()
    return {"rows": len(unique), "videos": len(videos), "labelled": labelled}


def video_table(
    keys: np.ndarray, frame_counts: dict[str, int], shards: Path
) -> tuple[list[VideoSpan], np.ndarray]:
    """(the video table, each row's frame number) of sorted unique keys (bytes)."""
    videos: list[VideoSpan] = []
    frames = np.empty(len(keys), dtype=np.int32)
    start = 0
    for row, raw in enumerate(keys):
        key = raw.decode("ascii", errors="replace")
        if not check_key(key):
            raise DataError(shards, f"sample key {excerpt(key)} is not <video>/<NNNNN>")
        video, _, frame = key.rpartition("/")
        frames[row] = int(frame)
        if row + 1 == len(keys) or not keys[row + 1].startswith(raw[: len(video) + 1]):
            last = int(frames[row])  # the video's last image: rows are in frame order
            count = max(int(frame_counts.get(video, last)), last)
            videos.append(VideoSpan(video, start, row + 1 - start, count))
            start = row + 1
    return videos, frames


def _merge_features(stems: list[Path], first: np.ndarray, target: Path) -> np.ndarray:
    """``features.npy`` (an open memmap) holding, row by row, the parts' rows ``first`` indexes
    (in the parts joined in rank order), copied ``MERGE_ROWS`` at a time."""
    parts = []
    for stem in stems:
        path = Path(f"{stem}.features.bin")
        rows = path.stat().st_size // (FEATURE_DIM * 2)
        parts.append(
            np.memmap(path, FEATURE_DTYPE, "r", shape=(rows, FEATURE_DIM)) if rows else None
        )
    offsets = np.cumsum([0] + [0 if p is None else len(p) for p in parts])
    out = np.lib.format.open_memmap(target, "w+", FEATURE_DTYPE, (len(first), FEATURE_DIM))
    _reserve(target)
    for start in range(0, len(first), MERGE_ROWS):
        rows = first[start : start + MERGE_ROWS]
        owner = np.searchsorted(offsets, rows, side="right") - 1
        chunk = np.empty((len(rows), FEATURE_DIM), FEATURE_DTYPE)
        for rank, part in enumerate(parts):
            mine = owner == rank
            if part is not None and mine.any():
                chunk[mine] = part[rows[mine] - offsets[rank]]
        out[start : start + len(rows)] = chunk
    return out


def _reserve(path: Path) -> None:
    """Allocate the memmapped file's blocks now: open_memmap makes a sparse file, and a page
    written to it on a full disk kills the process (SIGBUS) instead of raising ENOSPC here."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    finally:
        os.close(fd)


def _source(config: ExtractConfig, manifest_bytes: bytes) -> dict:
    """features.json's record of where the features come from: the checkpoint's bytes (hashed
    before the pass, so a best.pt rewritten meanwhile is not mistaken for them) and the pack's
    manifest.json bytes, as read before the pass."""
    fingerprint = Fingerprint.of(config.checkpoint)
    return {
        "checkpoint": {"path": str(config.checkpoint.absolute()), **fingerprint.to_dict()},
        "pack": {
            "path": str(config.shards.absolute()),
            "sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        },
    }


def _holds(run: TrainConfig, entries: dict[str, dict]) -> dict:
    """features.json's record of what the folder holds."""
    return {
        "frame_tasks": list(run.tasks),
        "feature_dim": FEATURE_DIM,
        "dtype": "float16",
        "image_size": run.image_size,
        "splits": entries,
    }
