"""build_loader: one contract, four kinds (dali-gpu, dali-cpu, wds, files). See DESIGN.md §3.

Every kind yields :class:`affectfast.batch.Batch` and follows the same epoch rules, so swapping the
kind never changes what the trainer sees (only how fast it comes):

- The samples of an epoch: uni-task loaders keep only frames that carry that task's label (and never
  decode the others); multi-task loaders keep every frame of the split, with a mask per task.
- Ranks: each of ``world_size`` ranks reads a disjoint part; together they cover every sample once.
- Training (``drop_last=True``): every rank yields exactly ``(N // world_size) // batch_size`` full
  batches, so DDP ranks never wait on each other at the end of an epoch.
- Evaluation (``drop_last=False``): every sample exactly once across ranks, the last batch partial,
  never a padding duplicate.
- ``set_epoch(e)`` reshuffles deterministically from ``(seed, e)`` (the train shards are already
  shuffled globally at pack time, so a ~1000-sample buffer shuffle is enough).

This module holds what the kinds share (the shard index, the augmentation spec, the torchvision
twin of the DALI geometry, the epoch arithmetic); each kind lives in its own module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from affectfast.batch import Batch
from affectfast.errors import DataError
from affectfast.tasks import IMAGE_EXT, LABEL_EXT, SPLITS, TASKS, parse_tasks, split_member

LOADER_KINDS = ("dali-gpu", "dali-cpu", "wds", "files")
INTERPOLATIONS = ("nearest", "linear")

# ImageNet statistics (0..1 scale): the trunk may start from ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Reader shuffle buffer (samples); DALI's default initial_fill, used by every kind alike.
SHUFFLE_BUFFER = 1024


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation shared by every loader kind; ``None`` instead of a spec means off."""

    flip: bool = True  # random horizontal flip with p = 0.5
    degrees: float = 10.0  # random rotation, uniform in [-degrees, +degrees]
    interpolation: str = "nearest"  # "nearest" (torchvision RandomRotation's default) or "linear"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if not 0 <= self.degrees <= 180:
            raise ValueError(f"degrees must be in [0, 180], got {self.degrees}")


class Loader(Protocol):
    """What build_loader returns: iterate it once per epoch."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...  # batches per epoch on this rank
    def set_epoch(self, epoch: int) -> None: ...  # reshuffle deterministically from (seed, epoch)


# --- the shard index ---------------------------------------------------------------------------


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


def _read_index(tar: Path, idx: Path) -> Shard:
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
        keys.append(key)
        components.append(frozenset(g[0] for g in groups))
        for ext, offset, size, _ in groups:
            end = max(end, int(offset) + int(size))
            if ext == IMAGE_EXT:
                jpeg_bytes += int(size)
                first_jpeg = first_jpeg if jpeg_bytes > int(size) else (int(offset), int(size))
    return Shard(tar, idx, tuple(keys), tuple(components), jpeg_bytes, end, first_jpeg)


@lru_cache(maxsize=64)
def _cached_index(tar: Path, idx: Path, stamp: tuple) -> Shard:
    return _read_index(tar, idx)


def split_shards(shards: str | Path, split: str) -> list[Shard]:
    """The shards of ``split`` in a pack folder, in order, checked against truncation.

    The shard list comes from ``manifest.json`` when present (else the ``<split>-*.tar`` files).
    A tar shorter than its index says, or than the manifest's byte count, is a DataError naming it:
    DALI would otherwise fail deep inside its reader and webdataset mid-epoch.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(shards)
    listed = _manifest_shards(folder, split)
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
        expected = max(shard.end, listed.get(tar.name) or 0)
        if stamp[0] < expected:
            raise DataError(
                tar,
                f"truncated shard: {stamp[0]} bytes, but its index/manifest need "
                f"at least {expected}; re-run pack or copy it again",
            )
        result.append(shard)
    return result


def _manifest_shards(folder: Path, split: str) -> dict[str, int]:
    """Shard name -> byte count from manifest.json (docs/shard-format.md); {} without a manifest."""
    if not (folder / "manifest.json").is_file():
        return {}
    from affectfast.pack import load_manifest

    manifest = load_manifest(folder)
    try:
        return {entry["name"]: int(entry["bytes"]) for entry in manifest["splits"][split]["shards"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(
            folder / "manifest.json",
            f"no shard list for split {split!r} ({type(error).__name__}: {error})",
        ) from None


def sample_counts(shards: list[Shard], tasks: tuple[str, ...]) -> np.ndarray:
    """Samples per shard that a loader of ``tasks`` yields (before splitting across ranks)."""
    return np.array([int(s.has(tasks).sum()) for s in shards], dtype=np.int64)


# --- epoch arithmetic shared by every kind -------------------------------------------------------


def batches_per_epoch(
    samples: int, batch_size: int, rank: int, world_size: int, drop_last: bool
) -> int:
    """Batches rank ``rank`` yields in one epoch of ``samples`` (see the module docstring).

    Every kind gives each rank at least ``samples // world_size`` samples, so with ``drop_last`` the
    same count holds on all ranks; without it each rank yields its own share, the last batch partial.
    """
    if drop_last:
        return (samples // world_size) // batch_size
    share = rank_share(samples, rank, world_size)
    return -(-share // batch_size)


def rank_range(samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank``'s contiguous part of an epoch: DALI's shard_id split, used by all."""
    return samples * rank // world_size, samples * (rank + 1) // world_size


def rank_share(samples: int, rank: int, world_size: int) -> int:
    """Number of samples rank ``rank`` reads per epoch (``samples // world_size`` or one more)."""
    lo, hi = rank_range(samples, rank, world_size)
    return hi - lo


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed for one (seed, epoch, rank): DALI takes int32 seeds."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_shard_order(shards: list, seed: int, epoch: int, shuffle: bool) -> list:
    """The shards in the order one epoch reads them: a fresh permutation per epoch when shuffling.

    The same on every rank (no rank in the seed), so ranks still split one sequence into disjoint
    contiguous parts. Readers only shuffle inside a buffer of about a thousand samples; permuting
    the shards too means a sample does not meet the same neighbours every epoch.
    """
    if not shuffle:
        return list(shards)
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(shards))
    return [shards[i] for i in order]


# --- the torchvision twin of the DALI geometry (used by wds and files) -------------------------


def torch_transform(image_size: int, augment: AugmentSpec | None):
    """torchvision v2 transforms from a PIL image to a normalized float32 CHW tensor.

    The same geometry as the DALI pipeline: resize to ``image_size`` (antialiased bilinear), random
    horizontal flip, random rotation about the centre with black corners, ImageNet normalize.
    """
    from torchvision.transforms import InterpolationMode, v2

    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if augment is not None:
        if augment.flip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        if augment.degrees > 0:
            mode = {"nearest": InterpolationMode.NEAREST, "linear": InterpolationMode.BILINEAR}
            steps.append(
                v2.RandomRotation(augment.degrees, interpolation=mode[augment.interpolation])
            )
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def collate_examples(examples: list[tuple], tasks: tuple[str, ...]) -> tuple:
    """(keys, images N×H×W×3, labels, masks) from ``(key, image CHW, {task: label or None})``.

    Images are stacked as HWC so the batch is NHWC-contiguous: its NCHW view is channels_last.
    """
    from affectfast.tasks import LABEL_SIZE

    keys = [e[0] for e in examples]
    images = torch.stack([e[1].permute(1, 2, 0) for e in examples])
    labels, masks = {}, {}
    for task in tasks:
        present = [e[2][task] is not None for e in examples]
        rows = [
            np.reshape(e[2][task], LABEL_SIZE[task]) if ok else np.zeros(LABEL_SIZE[task])
            for e, ok in zip(examples, present)
        ]
        column = torch.from_numpy(np.stack(rows).astype(np.float32))
        labels[task] = column[:, 0].long() if task == "expr" else column
        masks[task] = torch.tensor(present, dtype=torch.bool)
    return keys, images, labels, masks


def worker_init(worker_id: int) -> None:
    """DataLoader workers: one intra-op thread each (the workers are the parallelism)."""
    torch.set_num_threads(1)


class EpochLoader:
    """What every kind shares: the per-rank sample check, batches per epoch and the epoch number.

    Subclasses set up their source, then call ``super().__init__`` with the number of samples the
    task set keeps and the path to name in errors; they implement ``__iter__``.
    """

    def __init__(self, config: LoaderConfig, samples: int, source: Path):
        if samples < config.world_size:
            raise DataError(
                source,
                f"{config.split} has {samples} samples with "
                f"{','.join(config.tasks)}: fewer than the ranks",
            )
        self.config, self.samples, self.epoch = config, samples, 0

    def __len__(self) -> int:
        c = self.config
        return batches_per_epoch(self.samples, c.batch_size, c.rank, c.world_size, c.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically from (seed, epoch) at the next iteration."""
        self.epoch = epoch


def finish_batch(
    images_nhwc: torch.Tensor,
    labels: dict,
    masks: dict,
    keys: list[str] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Batch:
    """Move a batch to ``device``/``dtype``; NHWC images become an NCHW channels_last view (no copy)."""
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    images = images_nhwc.to(device, dtype, non_blocking=non_blocking).permute(0, 3, 1, 2)
    labels = {t: v.to(device, non_blocking=non_blocking) for t, v in labels.items()}
    masks = {t: v.to(device, non_blocking=non_blocking) for t, v in masks.items()}
    return Batch(images=images, labels=labels, masks=masks, keys=keys)


# --- the builder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a loader kind needs, validated once (build_loader's arguments, defaults resolved)."""

    kind: str
    shards: Path
    split: str
    tasks: tuple[str, ...]
    batch_size: int
    image_size: int
    augment: AugmentSpec | None
    shuffle: bool
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    with_keys: bool
    drop_last: bool
    seed: int
    num_threads: int
    tree: Path | None

    def __post_init__(self):
        if self.kind not in LOADER_KINDS:
            raise ValueError(f"kind must be one of {LOADER_KINDS}, got {self.kind!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        if self.batch_size < 1 or self.image_size < 8 or self.num_threads < 1:
            raise ValueError("batch_size and num_threads must be >= 1, image_size >= 8")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, world_size={self.world_size})")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.kind == "files" and self.tree is None:
            raise ValueError("kind='files' reads the raw Aff-Wild2 tree: pass tree=ROOT")
        if self.kind == "dali-gpu" and self.device.type != "cuda":
            raise ValueError("kind='dali-gpu' decodes on the GPU: pass a cuda device")


def build_loader(
    kind: str,
    shards: Path,  # a pack output folder (manifest.json + tars + idx)
    split: str,  # "train" or "val"
    tasks: tuple[str, ...],  # non-empty subset of TASKS, canonical order
    batch_size: int,
    *,
    image_size: int = 112,
    augment: AugmentSpec | None = None,
    shuffle: bool | None = None,  # default: True for train, False for val
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_keys: bool = False,
    drop_last: bool
    | None = None,  # default: True for train (equal batches on all ranks), False for val
    seed: int = 0,
    num_threads: int = 2,  # DALI threads / DataLoader workers
    tree: Path | None = None,  # the raw Aff-Wild2 root, needed by kind="files" only
) -> Loader:
    """Build a loader of ``Batch`` for one split and task set."""
    config = LoaderConfig(
        kind=kind,
        shards=Path(shards),
        split=split,
        tasks=parse_tasks(tasks),
        batch_size=batch_size,
        image_size=image_size,
        augment=augment,
        shuffle=(split == "train") if shuffle is None else shuffle,
        rank=rank,
        world_size=world_size,
        device=torch.device(device),
        dtype=dtype,
        with_keys=with_keys,
        drop_last=(split == "train") if drop_last is None else drop_last,
        seed=seed,
        num_threads=num_threads,
        tree=None if tree is None else Path(tree),
    )
    # Imported here so a wds user never loads DALI, and a DALI user never forks DataLoader workers.
    if kind in ("dali-gpu", "dali-cpu"):
        from affectfast.dali_pipeline import DaliLoader

        return DaliLoader(config)
    if kind == "wds":
        from affectfast.wds_loader import WdsLoader

        return WdsLoader(config)
    from affectfast.files_loader import FilesLoader

    return FilesLoader(config)
