"""The DALI loaders (``dali-gpu``, ``dali-cpu``): one pipeline function, the device switched.

The graph, per sample (docs/design.md §3):

    readers.webdataset ─▶ decoders.image ─▶ [resize] ─▶ [warp_affine] ─▶ crop_mirror_normalize ─▶ HWC
         │  (skip / empty)   (mixed | cpu)   to size     rotation         flip + normalize + dtype
         └─▶ labels ─▶ pad to a fixed shape with a sentinel (the masks follow from it)

- Uni-task reads with ``missing_component_behavior="skip"``: a frame without the label is dropped by
  the reader, never decoded. Multi-task reads with ``"empty"`` and pads missing labels.
- Resampling: frames are resized (bilinear, antialiased: what torchvision's ``Resize`` in the wds
  and files kinds does) only when the split's frames are not all ``image_size`` square, as the
  manifest's ``frame_sizes`` say; training then rotates with one ``warp_affine`` at that size.
  Train and eval see the same resampling of a frame, and a pack whose frames differ in size works
  everywhere. The flip is the ``mirror`` of the normalize that runs anyway.
- Output is HWC, so ``permute(0, 3, 1, 2)`` gives the NCHW channels_last view without a copy.
- Epochs: the pipeline is built once per loader and runs epoch after epoch. Training shuffles the
  whole split anew every epoch (``shuffle_after_epoch``, one reader seed on every rank) and each
  rank reads its own contiguous part of that order (``shard_id``/``num_shards``,
  ``stick_to_shard=False``): every sample once per epoch across ranks. Augmentation draws from a
  per-rank pipeline seed. ``state_dict()`` holds DALI's own checkpoint at an epoch boundary, so
  ``--resume`` continues the exact sequence without replaying epochs.
- Buffer lifetime on the GPU: with DALI's default (dynamic) executor ``DALIGenericIterator`` hands
  torch DALI's own output buffers without a copy (``plugin/pytorch/__init__.py``: ``copy = not
  is_exec_dynamic``); the executor does not reuse an output buffer torch still holds (see
  ``pipeline.py`` on ``exec_dynamic``), so the default executor is kept. That is an expectation
  from the sources; only a run on a GPU node proves it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from affectfast.batch import Batch
from affectfast.config import AugmentSpec
from affectfast.errors import DataError
from affectfast.loaders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochLoader,
    LoaderConfig,
    batch_labels,
    epoch_seed,
    finish_batch,
)
from affectfast.shards import KEY_RULE, Shard, check_key, frame_sizes, sample_counts, split_shards
from affectfast.tasks import IMAGE_EXT, LABEL_DTYPE, LABEL_EXT, LABEL_SIZE, VA_IGNORE, split_member

READER = "reader"
# Sentinels that fn.pad writes where a multi-task sample lacks a label; no valid label equals them.
SENTINEL = {"va": VA_IGNORE, "expr": 255, "au": 255}
DALI_LABEL_TYPE = {np.dtype("<f4"): types.FLOAT, np.dtype("u1"): types.UINT8}
DALI_INTERP = {"nearest": types.INTERP_NN, "linear": types.INTERP_LINEAR}


@dataclass(frozen=True)
class Geometry:
    """What the split's frames need to become ``image_size`` squares (from the manifest)."""

    image_size: int
    resize: bool  # some frame is not image_size x image_size
    largest: tuple[int, int]  # (height, width) bounds of the split's frames: decoder buffer hints


@pipeline_def
def affect_pipeline(
    tars: list[str],
    idxs: list[str],
    tasks: tuple[str, ...],
    geometry: Geometry,
    augment: AugmentSpec | None,
    gpu: bool,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    with_keys: bool,
    reader_seed: int,
    gpu_decoder: dict | None = None,
    out_dtype=types.FLOAT,
    decode_only: bool = False,
    dont_use_mmap: bool = False,
    read_ahead: bool = False,
):
    """Decode, augment and normalize one batch of frames; outputs (images, *labels[, keys])."""
    exts = [IMAGE_EXT] + [LABEL_EXT[t] for t in tasks]
    outputs = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=exts,
        name=READER,
        dtypes=[types.UINT8] + [DALI_LABEL_TYPE[LABEL_DTYPE[t]] for t in tasks],
        missing_component_behavior="skip" if len(tasks) == 1 else "empty",
        shard_id=shard_id,
        num_shards=num_shards,
        # Training: a new global order each epoch, the same on every rank (one reader seed), each
        # rank moving on to the next part of it (stick_to_shard=False; DALI refuses True here).
        shuffle_after_epoch=shuffle,
        stick_to_shard=not shuffle,
        pad_last_batch=True,
        seed=reader_seed,
        dont_use_mmap=dont_use_mmap,
        read_ahead=read_ahead,
    )
    # One component (the test split's image alone) comes back as a node, several as a list.
    jpegs, *labels = outputs if isinstance(outputs, list | tuple) else [outputs]
    # The GPU-only lines: nvJPEG (the hardware decoder takes hw_decoder_load of the images where
    # the GPU has one; affine, jpeg_fancy_upsampling: gpu_decoder) and decode buffers
    # preallocated for the split's largest frame.
    decode_args = (
        dict(
            device="mixed",
            preallocate_width_hint=geometry.largest[1],
            preallocate_height_hint=geometry.largest[0],
            **(gpu_decoder or {}),
        )
        if gpu
        else dict(device="cpu")
    )
    images = fn.decoders.image(jpegs, output_type=types.RGB, **decode_args)
    if decode_only:
        return (images,)
    images, flip = _geometry(images, geometry, augment)
    images = fn.crop_mirror_normalize(
        images,
        mirror=flip,
        dtype=out_dtype,
        output_layout="HWC",
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
    )
    padded = [
        fn.pad(label, fill_value=SENTINEL[t], shape=[LABEL_SIZE[t]])
        for t, label in zip(tasks, labels)
    ]
    if gpu:
        # GPU-only: labels travel with the images (in the graph, not as several small pageable
        # copies per step); the masks are then computed on the GPU (_to_batch).
        padded = [label.gpu() for label in padded]
    if with_keys:
        # "<tar>:<offset>:<key>.jpg" as bytes, zero-padded to the batch's longest (stays on the CPU).
        padded.append(fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0))
    return (images, *padded)


def _geometry(images, geometry: Geometry, augment: AugmentSpec | None):
    """Resize where the frames need it, then rotate for training; returns (images, flip or 0)."""
    size = geometry.image_size
    flip = fn.random.coin_flip(probability=0.5) if augment is not None and augment.flip else 0
    if geometry.resize:
        # torchvision's Resize (bilinear, antialiased): what wds/files do, on train and eval alike.
        images = fn.resize(
            images, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR
        )
    if augment is None or augment.degrees == 0:
        return images, flip
    # Rotation about the centre, source -> destination (inverse_map=False). Pixel centres sit at
    # +0.5, so [-1 0 W; 0 1 0] is an exact flip and the identity an exact copy (checked in tests).
    angle = fn.random.uniform(range=[-augment.degrees, augment.degrees])
    matrix = fn.transforms.rotation(angle=angle, center=[size / 2, size / 2])
    images = fn.warp_affine(
        images,
        matrix=matrix,
        size=[size, size],
        inverse_map=False,
        fill_value=0,
        interp_type=DALI_INTERP[augment.interpolation],
    )
    return images, flip


def split_geometry(config: LoaderConfig) -> Geometry:
    """The resampling the split needs, from the frame sizes the manifest records."""
    sizes = frame_sizes(config.shards, config.split)
    square = (config.image_size, config.image_size)
    largest = (max(h for h, _ in sizes), max(w for _, w in sizes)) if sizes else square
    return Geometry(config.image_size, set(sizes) != {square}, largest)


def build_pipeline(
    config: LoaderConfig,
    shards: list[Shard],
    *,
    decode_only: bool = False,
    checkpoint: str | None = None,
    prefetch: int = 2,
):
    """This rank's DALI pipeline over ``shards``, built, ready to run epoch after epoch.

    ``checkpoint``: a ``state_dict()["dali"]`` to continue from (checkpointing is on for training).
    """
    gpu = config.kind == "dali-gpu"
    # fp16 straight out of the normalize on the GPU; on the CPU DALI's fp16 conversion was slower
    # than its float32 normalize, so the CPU casts in torch (finish_batch) instead.
    out_dtype = types.FLOAT16 if gpu and config.dtype == torch.float16 else types.FLOAT
    pipe = affect_pipeline(
        [str(s.tar) for s in shards],
        [str(s.idx) for s in shards],
        config.label_tasks,
        split_geometry(config),
        config.augment,
        gpu,
        config.rank,
        config.world_size,
        config.shuffle,
        config.with_keys,
        epoch_seed(config.seed, 0),  # the same on every rank: one epoch order to split
        dict(
            hw_decoder_load=config.hw_decoder_load,
            affine=config.decoder_affine,
            jpeg_fancy_upsampling=config.fancy_upsampling,
        ),
        out_dtype,
        decode_only,
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        device_id=(config.device.index or 0) if gpu else None,
        seed=epoch_seed(config.seed, 0, config.rank),  # augmentation: its own draws per rank
        prefetch_queue_depth=prefetch,
        enable_checkpointing=config.shuffle and not decode_only,
        checkpoint=checkpoint,
        dont_use_mmap=config.dont_use_mmap,
        read_ahead=config.read_ahead,
    )
    pipe.build()
    return pipe


class DaliLoader(EpochLoader):
    """``dali-gpu`` / ``dali-cpu``: iterate once per epoch; see the module docstring.

    The pipeline is built at the first ``iter()`` and kept. Epochs run in order: ``set_epoch(e)``
    accepts the next epoch only, and ``load_state_dict`` continues a saved run. An epoch abandoned
    midway (a benchmark's partial pass) makes the next ``iter()`` build the pipeline afresh.
    """

    def __init__(self, config: LoaderConfig):
        self.shards = split_shards(config.shards, config.split)
        self.tars = {str(s.tar) for s in self.shards}  # the sources DALI may name in source_info
        samples = int(sample_counts(self.shards, config.label_tasks).sum())
        super().__init__(config, samples, config.shards)
        self._batches = None  # the DALIGenericIterator, kept across epochs
        self._checkpoint = None  # DALI state to build from (load_state_dict)
        self._in_epoch = False

    def pipeline(self, *, decode_only: bool = False):
        """A fresh pipeline with this loader's settings, built; benchmarks ``run()`` it bare.

        ``decode_only``: reader + decoder alone, same threads and batch size (the decode ceiling).
        """
        return build_pipeline(self.config, self.shards, decode_only=decode_only)

    def set_epoch(self, epoch: int) -> None:
        """Check that ``epoch`` is the next one: a built DALI pipeline runs its epochs in order."""
        if epoch != self.epoch:
            raise ValueError(
                f"the DALI loader's next epoch is {self.epoch}, not {epoch}: epochs run in order "
                "(load_state_dict continues a saved run)"
            )

    def state_dict(self) -> dict:
        """The position at an epoch boundary: epochs done, and DALI's checkpoint when training."""
        state = {"epoch": self.epoch}
        if self.config.shuffle:
            built = self._batches is not None
            state["dali"] = self._batches.checkpoints()[0] if built else self._checkpoint
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of the same run (same settings and rank)."""
        self._batches = None
        self.epoch, self._checkpoint = int(state["epoch"]), state.get("dali")

    def __iter__(self):
        try:
            yield from self._epoch()
            return
        except RuntimeError as error:
            if "pipeline" not in str(error):  # not DALI's: a bug, keep its traceback
                raise
            failure = _unreadable(self.shards, self.config.shards, error)
        self._batches = None  # a failed pipeline is never reused
        # Raised outside the handler, so it holds no reference to DALI's error, whose traceback
        # keeps the failed pipeline alive (a DataLoader forked meanwhile would hang destroying it).
        raise failure

    def _epoch(self):
        if self._batches is None or self._in_epoch:  # first epoch, or the last was abandoned
            self._open()
        self._in_epoch = True
        # len(self) batches on every rank: with drop_last the ranks' parts differ by up to one
        # sample, so one rank's DALI epoch may hold one batch more, drained below.
        for _ in range(len(self)):
            yield self._to_batch(next(self._batches)[0])
        # On to DALI's end of epoch (at most the one batch drop_last leaves), so reset() starts
        # the next cleanly. next(), not a for loop: iter() on a used DALI iterator resets it and
        # would run a whole further epoch.
        for _ in iter(lambda: next(self._batches, None), None):
            pass
        self._batches.reset()
        self._in_epoch = False
        self.epoch += 1

    def _open(self) -> None:
        c = self.config
        pipe = build_pipeline(c, self.shards, checkpoint=self._checkpoint)
        names = ["images", *c.label_tasks] + (["keys"] if c.with_keys else [])
        policy = LastBatchPolicy.DROP if c.drop_last else LastBatchPolicy.PARTIAL
        self._batches = DALIGenericIterator(
            [pipe], names, reader_name=READER, last_batch_policy=policy, auto_reset=False
        )
        self._in_epoch = False

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        labels, masks = {}, {}
        for task in self.config.tasks:
            if task not in out:  # not read (the unlabelled test split): zeros, masked out
                n = len(out["images"])
                labels[task] = batch_labels(task, torch.zeros(n, LABEL_SIZE[task]))
                masks[task] = torch.zeros(n, dtype=torch.bool)
                continue
            value = out[task]
            mask = value[:, 0] != SENTINEL[task]
            value = torch.where(mask[:, None], value, torch.zeros_like(value))
            labels[task] = batch_labels(task, value)
            masks[task] = mask
        keys = _decode_keys(out["keys"], self.tars) if self.config.with_keys else None
        return finish_batch(
            out["images"], labels, masks, keys, self.config.device, self.config.dtype
        )


def _unreadable(shards: list[Shard], folder: Path, error: RuntimeError) -> DataError:
    """DALI's reader or decoder failed (a corrupt JPEG, a tar unlike its index): name the shards
    (its message names none) with DALI's reason in one line."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and "no longer valid" not in line]
    after = lines.index("encountered:") + 1 if "encountered:" in lines else len(lines) - 1
    reason = lines[after] if 0 <= after < len(lines) else "no reason given"
    names = ", ".join(s.tar.name for s in shards[:3])
    names += f" and {len(shards) - 3} more" if len(shards) > 3 else ""
    return DataError(
        shards[0].tar if len(shards) == 1 else folder,
        f"DALI could not read a sample of {names} ({reason}); "
        f"find it with `affectfast verify {folder} --decode`",
    )


def _decode_keys(source_info: torch.Tensor, tars: set[str]) -> list[str]:
    """Sample keys from zero-padded ``<tar>:<offset>:<video>/<NNNNN>.jpg`` source-info bytes.

    Cut from the right (a tar path may hold ':'); a key that breaks ``check_key``, or a source that
    is not one of ``tars``, is a DataError naming the shard: keys must never collapse or escape.
    """
    keys = []
    for row in source_info.cpu().numpy():
        info = os.fsdecode(bytes(row).rstrip(b"\0"))  # as str(Path) decodes the tar path
        tar, offset, member = (info.rsplit(":", 2) + ["", ""])[:3]
        key = split_member(member)[0]
        if tar not in tars or not offset.isdigit() or not check_key(key):
            raise DataError(
                tar if tar in tars else Path(next(iter(tars))).parent,
                f"sample {member!r} (source {info!r}) does not name a sample: {KEY_RULE}; "
                "run affectfast verify",
            )
        keys.append(key)
    return keys
