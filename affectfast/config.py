"""The configurations a run is made of: frozen dataclasses, validated where they enter.

No torch or DALI here: the CLI reads every default from these fields when it shows ``--help``, so
each default is written once and help stays fast. Each object is saved beside its run (``config.json``)
and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

from affectfast.constants import (
    AMP_CHOICES,
    DEVICES,
    INTERPOLATIONS,
    LOADER_KINDS,
    SHARD_LOADER_KINDS,
    SPLITS,
    VA_LOSSES,
)
from affectfast.tasks import TASKS, parse_tasks

MAX_SEED = 2**31 - 1  # DALI and numpy's legacy seeding take 32-bit seeds


def parse_init(init: str) -> tuple[str, Path | None]:
    """Split an init string into (kind, path); raise ValueError on an unknown form."""
    if init in ("scratch", "imagenet"):
        return init, None
    kind, sep, path = init.partition(":")
    if sep and kind in ("imagenet", "ckpt") and path:
        return kind, Path(path)
    raise ValueError(f"init must be scratch, imagenet, imagenet:PATH or ckpt:PATH; got {init!r}")


def valid_threads(num_threads) -> bool:
    """A thread count setting: "auto" (resolved on the machine that runs) or an int >= 1."""
    return num_threads == "auto" or (type(num_threads) is int and num_threads >= 1)


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


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as config.json and inside every checkpoint.

    Defaults fit a GPU node (DALI on the GPU, mixed precision, channels_last); :func:`resolve_device`
    turns them into their CPU twins where CUDA is absent.
    """

    shards: Path  # a pack output folder (manifest.json + train/val shards)
    out: Path  # the run folder, e.g. runs/NAME
    tasks: tuple[str, ...] = TASKS
    loader: str = "dali-gpu"  # one of LOADER_KINDS
    epochs: int = 10
    batch_size: int = 256  # per rank
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 1e-4
    image_size: int = 112  # px, square
    amp: str = "auto"  # auto (bf16 where supported, else fp16; off on the CPU) | bf16 | fp16 | off
    channels_last: bool = True
    init: str = "scratch"  # scratch | imagenet | imagenet:PATH | ckpt:PATH
    va_loss: str = "ccc"  # ccc (1 - CCC) | mse
    task_weights: tuple[tuple[str, float], ...] = ()  # (task, weight) pairs; unlisted tasks weigh 1
    augment: bool = True  # random flip + rotation on train
    rotate_degrees: float = 10.0
    flip: bool = True
    interpolation: str = "nearest"  # nearest | linear
    seed: int = 0
    num_threads: int | str = "auto"  # DALI threads / DataLoader workers per rank (train.py)
    tune_au_thresholds: bool = False  # also report AU F1 at per-AU thresholds tuned on val
    tree: Path | None = None  # the raw Aff-Wild2 root, for loader "files" only
    device: str = "auto"  # auto (CUDA where present) | cuda | cpu
    deterministic: bool = False  # CUDA: reproducible kernels, no TF32, no cuDNN autotuning
    torch_compile: bool = False  # torch.compile the model for training (default mode)
    hw_decoder_load: float = 0.65  # dali-gpu: share of JPEGs for the hardware decoder
    # dali-gpu: pin the decoder's threads to cores (DALI's default; off where a scheduler's
    # cpuset excludes the cores DALI picks).
    decoder_affine: bool = True
    # dali-gpu: libjpeg-turbo's chroma upsampling, so GPU and CPU decodes agree more closely; off
    # (DALI's default) until `affectfast doctor` has measured parity and speed on a GPU node.
    fancy_upsampling: bool = False
    # Storage: neither changes the results, so a run may --resume with other values.
    stage_dir: Path | None = None  # node-local folder to copy the pack into first (stage.py)
    dont_use_mmap: bool = False  # DALI reader: plain reads instead of mmap (shared filesystems)
    read_ahead: bool = False  # DALI reader: read each tar ahead on first access

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("shards", Path(self.shards))
        set_("out", Path(self.out))
        set_("tree", None if self.tree is None else Path(self.tree))
        set_("stage_dir", None if self.stage_dir is None else Path(self.stage_dir))
        set_("tasks", parse_tasks(self.tasks))
        set_("task_weights", tuple((str(t), float(w)) for t, w in dict(self.task_weights).items()))
        parse_init(self.init)
        checks = [
            (self.loader in LOADER_KINDS, f"loader must be one of {LOADER_KINDS}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (BatchNorm and CCC need two frames)"),
            (
                0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf,
                "lr must be finite and > 0, weight_decay finite and >= 0",
            ),
            (self.image_size >= 32, "image_size must be >= 32 px"),
            (self.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}"),
            (self.va_loss in VA_LOSSES, f"va_loss must be one of {VA_LOSSES}"),
            (
                all(t in self.tasks and 0 <= w < math.inf for t, w in self.task_weights),
                "task_weights must name trained tasks with finite weights >= 0",
            ),
            (
                self.interpolation in INTERPOLATIONS,
                f"interpolation must be one of {INTERPOLATIONS}",
            ),
            (0 <= self.rotate_degrees <= 180, "rotate_degrees must be in [0, 180]"),
            (valid_threads(self.num_threads), 'num_threads must be "auto" or >= 1'),
            (0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}] (DALI takes int32)"),
            (self.loader != "files" or self.tree is not None, "loader files needs tree"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (0 <= self.hw_decoder_load <= 1, "hw_decoder_load must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict (paths as strings, tuples as lists)."""
        d = dataclasses.asdict(self)
        d.update(
            shards=str(self.shards),
            out=str(self.out),
            tree=None if self.tree is None else str(self.tree),
            stage_dir=None if self.stage_dir is None else str(self.stage_dir),
            tasks=list(self.tasks),
            task_weights=[list(p) for p in self.task_weights],
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            **{
                **d,
                "tasks": tuple(d["tasks"]),
                "task_weights": tuple(map(tuple, d["task_weights"])),
            }
        )

    @property
    def augment_spec(self) -> AugmentSpec | None:
        return (
            AugmentSpec(self.flip, self.rotate_degrees, self.interpolation)
            if self.augment
            else None
        )


@dataclass(frozen=True)
class EvalConfig:
    """What evaluate and predict need beyond the checkpoint (which carries tasks, image size, precision)."""

    checkpoint: Path
    shards: Path
    split: str = "val"
    loader: str = "dali-gpu"  # one of SHARD_LOADER_KINDS ("files" needs the raw tree)
    batch_size: int = 256
    num_threads: int | str = "auto"  # as TrainConfig.num_threads
    tune_au_thresholds: bool = False  # also report AU F1 at per-AU thresholds tuned on split
    # evaluate: choose a smoothing window per task on split, save smoothing.json beside checkpoint
    tune_smoothing: bool = False
    smooth: bool = False  # predict: apply the windows of smoothing.json beside the checkpoint
    frame_counts: Path | None = None  # predict: a "video,frames" CSV of frames per video

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "shards", Path(self.shards))
        if self.frame_counts is not None:
            object.__setattr__(self, "frame_counts", Path(self.frame_counts))
        if (
            self.loader not in SHARD_LOADER_KINDS
            or self.split not in SPLITS
            or self.batch_size < 1
            or not valid_threads(self.num_threads)
        ):
            raise ValueError(f"bad evaluation settings: {self!r}")
