"""What the loader kinds share: their settings, epoch rules and arithmetic, the torchvision twin.

Every kind yields :class:`affectfast.batch.Batch` and follows the same epoch rules, so swapping the
kind never changes what the trainer sees (only how fast it comes):

- The samples of an epoch: uni-task loaders keep only frames that carry that task's label (and never
  decode the others); multi-task loaders keep every frame of the split, with a mask per task. On
  the unlabelled ``test`` split every kind reads images only and keeps every frame, masks all false.
- Ranks: each of ``world_size`` ranks reads a disjoint part; together they cover every sample once
  per epoch. Rank r's part holds ``rank_share(N, r, world_size)`` samples.
- Training (``drop_last=True``): every rank yields exactly ``(N // world_size) // batch_size`` full
  batches of real samples (never a padding duplicate), so DDP ranks never wait on each other at
  the end of an epoch; the samples past them are left out of that epoch.
- Evaluation (``drop_last=False``): every sample exactly once across ranks, the last batch partial,
  never a padding duplicate.
- Order (training, ``shuffle=True``): every epoch reads the samples in a fresh order drawn from
  ``(seed, epoch)``, at the level of samples: the shards' order is drawn anew and the samples pass
  through a shuffle buffer of ``shuffle_buffer`` samples, so a frame's batch-mates change from epoch
  to epoch (a new shard order alone would batch it with the same stored neighbours every time).
  The buffer mixes samples within a window of that many samples of the epoch's shard sequence; the
  train shards were also shuffled globally at pack time, so each window is a random draw of the
  split. Another seed gives other orders. Evaluation reads in stored order.

The shard index is ``affectfast.shards``, the augmentation spec ``affectfast.config.AugmentSpec``;
each kind lives in its own module beside this one, and ``build_loader`` in the package.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from affectfast.batch import Batch
from affectfast.config import AugmentSpec
from affectfast.constants import LOADER_KINDS
from affectfast.errors import DataError
from affectfast.tasks import LABEL_SIZE, SPLITS, TASKS, labels_in_range

# ImageNet statistics (0..1 scale): the trunk may start from ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Samples a training loader draws its order from (DALI's initial_fill; wds's buffer per worker).
# Large against a batch: two frames read side by side share a batch in about
# batch_size / (2 SHUFFLE_BUFFER) of epochs, independently from epoch to epoch (0.8% at batch 256,
# measured on DALI's reader); and spanning many shards of the default size (pack.PackConfig.
# shard_size), so the shards that meet in a batch change with each epoch's shard order. Its cost is
# host memory: 130-290 MiB more anonymous RSS per DALI training loader (benchmarks, README).
SHUFFLE_BUFFER = 16_384


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


def stream_seed(seed: int, stream: str, rank: int = 0) -> int:
    """A 31-bit seed for one named stream of random draws (``"flip"``, ``"sample order"``, ...) of
    a run and rank: each stream's draws then depend on the run's seed alone, not on how many other
    random operators a pipeline holds (so a GPU and a CPU pipeline draw alike)."""
    key = int.from_bytes(stream.encode(), "little")
    return int(np.random.SeedSequence([seed, key, rank]).generate_state(1)[0] & 0x7FFFFFFF)


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


def batch_labels(task: str, rows: torch.Tensor) -> torch.Tensor:
    """A batch's ``task`` labels in Batch's types from N×size rows: EXPR int64 N, else float32."""
    return rows[:, 0].long() if task == "expr" else rows.float()


def collate_examples(examples: list[tuple], tasks: tuple[str, ...]) -> tuple:
    """(keys, images N×H×W×3, labels, masks) from ``(key, image CHW, {task: label or None})``.

    Images are stacked as HWC so the batch is NHWC-contiguous: its NCHW view is channels_last.
    """
    keys = [e[0] for e in examples]
    images = torch.stack([e[1].permute(1, 2, 0) for e in examples])
    labels, masks = {}, {}
    for task in tasks:
        present = [e[2][task] is not None for e in examples]
        rows = [
            np.reshape(e[2][task], LABEL_SIZE[task]) if ok else np.zeros(LABEL_SIZE[task])
            for e, ok in zip(examples, present)
        ]
        labels[task] = batch_labels(task, torch.from_numpy(np.stack(rows).astype(np.float32)))
        masks[task] = torch.tensor(present, dtype=torch.bool)
    return keys, images, labels, masks


@dataclass(frozen=True)
class WorkerError:
    """A DataError raised in a DataLoader worker, passed to the main process as data.

    torch re-raises a worker's exception by calling its type with the traceback text, which a
    DataError (path, message) does not take: the user would get a RuntimeError holding a traceback.
    """

    error: DataError


def carry_errors(items):
    """Stage (last in a worker): yield ``items``; a DataError ends them as a :class:`WorkerError`."""
    try:
        yield from items
    except DataError as error:
        yield WorkerError(error)


def raise_worker_error(item):
    """In the main process: ``item``, or the worker's DataError raised again."""
    if isinstance(item, WorkerError):
        raise item.error
    return item


def collect_before_fork() -> None:
    """Collect cyclic garbage before forking DataLoader workers. A DALI pipeline left in a
    reference cycle (an exception's traceback holding a loader, say) would otherwise be destroyed
    by a forked worker's garbage collector, where its threads do not exist: the worker hangs in
    DALI's executor destructor (seen in the test suite), and the epoch with it."""
    gc.collect()


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

    def state_dict(self) -> dict:
        """Where the loader stands at an epoch boundary: the next epoch (its order follows)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``."""
        self.epoch = int(state["epoch"])


def screen_labels(labels: dict, masks: dict) -> torch.Tensor:
    """Take labels marked valid but out of range or not finite (``tasks.labels_in_range``) out of
    a batch, in place (mask off, value 0), and return a 0-dim bool on their device: True if any.

    No host sync: the trainer folds the flag per batch and reads it with the epoch's loss, while
    the step only ever sees sane labels (cross-entropy on class 200 is an IndexError on the CPU
    and a device-side assert on a GPU; a NaN target's gradient is NaN even where masked).
    """
    faults = torch.zeros((), dtype=torch.bool, device=next(iter(labels.values())).device)
    for task, values in labels.items():
        bad = masks[task] & ~labels_in_range(task, values)
        faults = faults | bad.any()
        masks[task] = masks[task] & ~bad
        labels[task] = torch.where(bad.view(-1, *[1] * (values.dim() - 1)), 0, values)
    return faults


def normalize(images_nhwc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NHWC pixels -> ``dtype``, ImageNet-normalized as DALI's crop_mirror_normalize does
    (``(x - 255 mean) / (255 std)`` in float32), on the tensor's own device."""
    mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=images_nhwc.device)
    std = torch.tensor([255 * s for s in IMAGENET_STD], device=images_nhwc.device)
    return ((images_nhwc.float() - mean) / std).to(dtype)


def finish_batch(
    images_nhwc: torch.Tensor,
    labels: dict,
    masks: dict,
    keys: list[str] | None,
    device: torch.device,
    dtype: torch.dtype,
    pin: bool = False,
) -> Batch:
    """Move a batch to ``device``/``dtype``; NHWC images become an NCHW channels_last view (no copy).

    The copy comes first and the cast runs on ``device``: a CPU cast to bf16 before the copy would
    spend CPU time and leave a pageable tensor (a pinned one stays pinned until the copy). uint8
    images (dali-cpu bound for a GPU: a quarter of float32's bytes to copy) are normalized there.
    ``pin``: copy the images into page-locked memory first, so the copy to a GPU runs
    asynchronously (from pageable memory it waits on the host for a staging copy).
    """
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    if pin and non_blocking and images_nhwc.device.type == "cpu" and not images_nhwc.is_pinned():
        images_nhwc = images_nhwc.pin_memory()
    images = images_nhwc.to(device, non_blocking=non_blocking)
    images = normalize(images, dtype) if images.dtype == torch.uint8 else images.to(dtype)
    labels = {t: v.to(device, non_blocking=non_blocking) for t, v in labels.items()}
    masks = {t: v.to(device, non_blocking=non_blocking) for t, v in masks.items()}
    return Batch(images=images.permute(0, 3, 1, 2), labels=labels, masks=masks, keys=keys)


# --- the settings every kind reads --------------------------------------------------------------


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
    hw_decoder_load: float = 0.65  # dali-gpu: share of images for the hardware JPEG decoder
    decoder_affine: bool = True  # dali-gpu: pin decoder threads to cores (DALI's default)
    fancy_upsampling: bool = False  # dali-gpu: chroma upsampling as libjpeg-turbo (CPU) does
    # DALI's reader only (the shared-filesystem case): plain reads instead of mmap; read ahead.
    dont_use_mmap: bool = False
    read_ahead: bool = False
    shuffle_buffer: int = SHUFFLE_BUFFER  # training: samples the order is drawn from (see above)

    def __post_init__(self):
        if self.kind not in LOADER_KINDS:
            raise ValueError(f"kind must be one of {LOADER_KINDS}, got {self.kind!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        if self.batch_size < 1 or self.image_size < 8 or self.num_threads < 1:
            raise ValueError("batch_size and num_threads must be >= 1, image_size >= 8")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, world_size={self.world_size})")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.kind == "files" and self.tree is None:
            raise ValueError("kind='files' reads the raw Aff-Wild2 tree: pass tree=ROOT")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.kind == "dali-gpu" and self.device.type != "cuda":
            raise ValueError("kind='dali-gpu' decodes on the GPU: pass a cuda device")

    @property
    def label_tasks(self) -> tuple[str, ...]:
        """The tasks whose labels are read: none on the unlabelled test split (its samples hold
        the image alone, so a uni-task reader must not drop them all), else ``tasks``. Batches
        still carry every task of ``tasks``, with masks all false where no label was read."""
        return () if self.split == "test" else self.tasks
