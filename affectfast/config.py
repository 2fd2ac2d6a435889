"""The configurations a run is made of: frozen dataclasses, validated where they enter.

No torch or DALI here: the CLI reads every default from these fields when it shows ``--help``, so
each default is written once and help stays fast. Each object is saved beside its run (``config.json``)
and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

from affectfast.constants import (
    AMP_CHOICES,
    DEVICES,
    INTERPOLATIONS,
    LOADER_KINDS,
    SEQUENCE_MODELS,
    SHARD_LOADER_KINDS,
    SPLITS,
    VA_LOSSES,
)
from affectfast.safe_files import excerpt
from affectfast.tasks import TASKS, parse_tasks

MAX_SEED = 2**31 - 1  # DALI and numpy's legacy seeding take 32-bit seeds


def parse_init(init: str) -> tuple[str, Path | None]:
    """Split an init string into (kind, path); raise ValueError on an unknown form."""
    if init in ("scratch", "imagenet"):
        return init, None
    kind, sep, path = init.partition(":") if isinstance(init, str) else ("", "", "")
    if sep and kind in ("imagenet", "ckpt") and path:
        return kind, Path(path)
    raise ValueError(
        f"init must be scratch, imagenet, imagenet:PATH or ckpt:PATH; got {excerpt(init)}"
    )


def valid_threads(num_threads) -> bool:
    """A thread count setting: "auto" (resolved on the machine that runs) or an int >= 1."""
    return num_threads == "auto" or (type(num_threads) is int and num_threads >= 1)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike))


def _is_pair(value) -> bool:
    """A (task, weight) pair as a config or its JSON holds it."""
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and isinstance(value[0], str)
        and _is_real(value[1])
    )


# What a field of each annotation must hold before its value is looked at: values read back from
# a checkpoint or config.json may be anything, and an error quotes only the offending field.
_TYPE_CHECKS = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: type(v) is int, "an integer"),
    "float": (_is_real, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "Path": (_is_path, "a path"),
    "Path | None": (lambda v: v is None or _is_path(v), "a path or null"),
    "tuple[str, ...]": (
        lambda v: (
            isinstance(v, str)
            or (isinstance(v, (tuple, list)) and all(isinstance(t, str) for t in v))
        ),
        "task names",
    ),
    "tuple[tuple[str, float], ...]": (
        lambda v: (
            (isinstance(v, dict) and all(map(_is_pair, v.items())))
            or (isinstance(v, (tuple, list)) and all(map(_is_pair, v)))
        ),
        "(task, weight) pairs",
    ),
    "int | str": (valid_threads, '"auto" or an integer >= 1'),
}


def check_field_types(config) -> None:
    """Raise ValueError naming the first field of the dataclass ``config`` that does not hold its
    annotated type, quoting a bounded excerpt of that field alone."""
    for f in dataclasses.fields(config):
        check, expected = _TYPE_CHECKS.get(f.type, (lambda v: True, ""))
        value = getattr(config, f.name)
        if not check(value):
            raise ValueError(f"{f.name} must be {expected}; got {excerpt(value)}")


def check_fields(config, checks) -> None:
    """Raise ValueError for the first failing ``(field, ok, message)`` of ``checks``, quoting a
    bounded excerpt of that field alone (never the whole config)."""
    for name, ok, message in checks:
        if not ok:
            raise ValueError(f"{message}; got {name}={excerpt(getattr(config, name))}")


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation shared by every loader kind; ``None`` instead of a spec means off."""

    flip: bool = True  # random horizontal flip with p = 0.5
    degrees: float = 10.0  # random rotation, uniform in [-degrees, +degrees]
    interpolation: str = "nearest"  # "nearest" (torchvision RandomRotation's default) or "linear"

    def __post_init__(self):
        check_field_types(self)
        check_fields(
            self,
            [
                (
                    "interpolation",
                    self.interpolation in INTERPOLATIONS,
                    f"interpolation must be one of {INTERPOLATIONS}",
                ),
                ("degrees", 0 <= self.degrees <= 180, "degrees must be in [0, 180]"),
            ],
        )


class SavedConfig:
    """A run's config as config.json and every checkpoint hold it: :meth:`to_dict` gives JSON
    (paths as strings, tuples as lists, pairs as lists), :meth:`from_dict` reads it back."""

    def to_dict(self) -> dict:
        """JSON-ready dict (paths as strings, tuples as lists)."""
        return {
            field.name: _json_ready(getattr(self, field.name)) for field in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of :meth:`to_dict`."""
        return cls(
            **{
                **d,
                "tasks": tuple(d["tasks"]),
                "task_weights": tuple(map(tuple, d["task_weights"])),
            }
        )


def _json_ready(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_json_ready(v) for v in value]
    return value


@dataclass(frozen=True)
class TrainConfig(SavedConfig):
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
        check_field_types(self)  # first: what follows may compare, convert and quote them
        set_ = functools.partial(object.__setattr__, self)
        set_("shards", Path(self.shards))
        set_("out", Path(self.out))
        set_("tree", None if self.tree is None else Path(self.tree))
        set_("stage_dir", None if self.stage_dir is None else Path(self.stage_dir))
        try:
            set_("tasks", parse_tasks(self.tasks))
        except ValueError:
            raise ValueError(
                f"tasks must be a non-empty subset of {','.join(TASKS)}; got {excerpt(self.tasks)}"
            ) from None
        set_("task_weights", tuple((str(t), float(w)) for t, w in dict(self.task_weights).items()))
        parse_init(self.init)
        check_fields(
            self,
            [
                ("loader", self.loader in LOADER_KINDS, f"loader must be one of {LOADER_KINDS}"),
                ("epochs", self.epochs >= 1, "epochs must be >= 1"),
                (
                    "batch_size",
                    self.batch_size >= 2,
                    "batch_size must be >= 2 (BatchNorm and CCC need two frames)",
                ),
                ("lr", 0 < self.lr < math.inf, "lr must be finite and > 0"),
                (
                    "weight_decay",
                    0 <= self.weight_decay < math.inf,
                    "weight_decay must be finite and >= 0",
                ),
                ("image_size", self.image_size >= 32, "image_size must be >= 32 px"),
                ("amp", self.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}"),
                ("va_loss", self.va_loss in VA_LOSSES, f"va_loss must be one of {VA_LOSSES}"),
                (
                    "task_weights",
                    all(t in self.tasks and 0 <= w < math.inf for t, w in self.task_weights),
                    "task_weights must name trained tasks with finite weights >= 0",
                ),
                (
                    "interpolation",
                    self.interpolation in INTERPOLATIONS,
                    f"interpolation must be one of {INTERPOLATIONS}",
                ),
                (
                    "rotate_degrees",
                    0 <= self.rotate_degrees <= 180,
                    "rotate_degrees must be in [0, 180]",
                ),
                (
                    "seed",
                    0 <= self.seed <= MAX_SEED,
                    f"seed must be in [0, {MAX_SEED}] (DALI takes int32)",
                ),
                (
                    "tree",
                    self.loader != "files" or self.tree is not None,
                    "loader files needs tree",
                ),
                ("device", self.device in DEVICES, f"device must be one of {DEVICES}"),
                (
                    "hw_decoder_load",
                    0 <= self.hw_decoder_load <= 1,
                    "hw_decoder_load must be in [0, 1]",
                ),
            ],
        )

    @property
    def augment_spec(self) -> AugmentSpec | None:
        return (
            AugmentSpec(self.flip, self.rotate_degrees, self.interpolation)
            if self.augment
            else None
        )


# A sequence head learns each AU's on/off state from that AU's own cues: twelve binary states to
# carry through time, while the AU loss (the mean of 12 BCEs) weighs as much as EXPR's one. Where
# --task-weights does not name AU, it weighs 6: on the held-out onset-cue experiment
# (docs/temporal.md) AU 1 -> 6 gave F1-AU +0.05 for F1-EXPR -0.07.
TEMPORAL_TASK_WEIGHTS = {"au": 6.0}


@dataclass(frozen=True)
class TemporalConfig(SavedConfig):
    """Everything that defines a train-temporal run (a sequence head over a feature folder);
    saved as config.json and inside every checkpoint, as TrainConfig is."""

    features: Path  # a feature folder (affectfast extract)
    out: Path  # the run folder, e.g. runs/NAME-temporal
    tasks: tuple[str, ...] = TASKS
    model: str = "gru"  # one of SEQUENCE_MODELS
    window: int = 256  # frames per window
    stride: int = 128  # frames between window starts (overlap = window - stride)
    # A small tree has few windows (one per video shorter than the window): 30 epochs of 8
    # windows at 3e-3 learn onset-only cues there, where 20 epochs of 16 at 1e-3 did not
    # (docs/temporal.md); Aff-Wild2 has ~22k windows, so an epoch is ~2,800 steps.
    epochs: int = 30
    batch_size: int = 8  # windows per step
    lr: float = 3e-3  # AdamW peak learning rate (warm-up, then cosine, as train)
    weight_decay: float = 1e-2
    hidden: int = 128  # the encoder's width (GRU: per direction)
    dropout: float = 0.1
    va_loss: str = "ccc"  # ccc (1 - CCC) | mse
    # (task, weight) pairs; an unlisted task weighs TEMPORAL_TASK_WEIGHTS' weight, else 1. The
    # weights in force (defaults filled in) are what config.json records.
    task_weights: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    tune_au_thresholds: bool = False  # also report AU F1 at per-AU thresholds tuned on val
    device: str = "auto"  # auto (CUDA where present) | cuda | cpu

    def __post_init__(self):
        check_field_types(self)
        set_ = functools.partial(object.__setattr__, self)
        set_("features", Path(self.features))
        set_("out", Path(self.out))
        try:
            set_("tasks", parse_tasks(self.tasks))
        except ValueError:
            raise ValueError(
                f"tasks must be a non-empty subset of {','.join(TASKS)}; got {excerpt(self.tasks)}"
            ) from None
        given = dict(self.task_weights)
        defaults = {t: w for t, w in TEMPORAL_TASK_WEIGHTS.items() if t in self.tasks}
        weights = {**{t: w for t, w in defaults.items() if t not in given}, **given}
        set_("task_weights", tuple((str(t), float(w)) for t, w in weights.items()))
        check_fields(
            self,
            [
                ("model", self.model in SEQUENCE_MODELS, f"model must be one of {SEQUENCE_MODELS}"),
                ("window", self.window >= 2, "window must be >= 2 frames"),
                ("stride", 1 <= self.stride <= self.window, "stride must be in [1, window]"),
                ("epochs", self.epochs >= 1, "epochs must be >= 1"),
                ("batch_size", self.batch_size >= 1, "batch_size must be >= 1 window"),
                ("lr", 0 < self.lr < math.inf, "lr must be finite and > 0"),
                (
                    "weight_decay",
                    0 <= self.weight_decay < math.inf,
                    "weight_decay must be finite and >= 0",
                ),
                (
                    "hidden",
                    self.hidden >= 8 and self.hidden % 4 == 0,
                    "hidden must be a multiple of 4, >= 8",
                ),
                ("dropout", 0 <= self.dropout < 1, "dropout must be in [0, 1)"),
                ("va_loss", self.va_loss in VA_LOSSES, f"va_loss must be one of {VA_LOSSES}"),
                (
                    "task_weights",
                    all(t in self.tasks and 0 <= w < math.inf for t, w in self.task_weights),
                    "task_weights must name trained tasks with finite weights >= 0",
                ),
                ("seed", 0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}]"),
                ("device", self.device in DEVICES, f"device must be one of {DEVICES}"),
            ],
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
    # A temporal checkpoint's feature folder (affectfast extract); without it the features are
    # extracted on the fly from shards with the frame checkpoint the temporal one names.
    features: Path | None = None

    def __post_init__(self):
        check_field_types(self)
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "shards", Path(self.shards))
        if self.frame_counts is not None:
            object.__setattr__(self, "frame_counts", Path(self.frame_counts))
        if self.features is not None:
            object.__setattr__(self, "features", Path(self.features))
        check_fields(
            self,
            [
                (
                    "loader",
                    self.loader in SHARD_LOADER_KINDS,
                    f"loader must be one of {SHARD_LOADER_KINDS}",
                ),
                ("split", self.split in SPLITS, f"split must be one of {SPLITS}"),
                ("batch_size", self.batch_size >= 1, "batch_size must be >= 1"),
            ],
        )


@dataclass(frozen=True)
class ExtractConfig:
    """What ``affectfast extract`` needs beyond the frame checkpoint (which carries its tasks,
    image size and precision): where to read, where to write, which splits."""

    checkpoint: Path
    shards: Path
    out: Path  # the feature folder: missing or empty
    splits: tuple[str, ...] = ()  # empty: every split the pack has
    loader: str = "dali-gpu"  # one of SHARD_LOADER_KINDS (without CUDA dali-gpu -> dali-cpu)
    batch_size: int = 256
    num_threads: int | str = "auto"  # as TrainConfig.num_threads

    def __post_init__(self):
        check_field_types(self)
        for name in ("checkpoint", "shards", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        splits = (self.splits,) if isinstance(self.splits, str) else tuple(self.splits)
        object.__setattr__(self, "splits", splits)
        check_fields(
            self,
            [
                (
                    "splits",
                    all(s in SPLITS for s in splits) and len(set(splits)) == len(splits),
                    f"splits must be distinct names of {SPLITS}",
                ),
                (
                    "loader",
                    self.loader in SHARD_LOADER_KINDS,
                    f"loader must be one of {SHARD_LOADER_KINDS}",
                ),
                ("batch_size", self.batch_size >= 1, "batch_size must be >= 1"),
            ],
        )
