"""The DALI loaders (``dali-gpu``, ``dali-cpu``): one pipeline function, the device switched.

The graph, per sample (docs/design.md §3):

    readers.webdataset ─▶ decoders.image ─▶ [resize] ─▶ [warp_affine] ─▶ crop_mirror_normalize ─▶ HWC
         │  (skip / empty)   (mixed | cpu)   to size     rotation         flip + normalize + dtype
         ├─▶ peek_image_shape: each frame's size from its JPEG header, checked against the manifest
         └─▶ labels ─▶ pad to a fixed shape with a sentinel (the masks follow from it)

- Uni-task reads with ``missing_component_behavior="skip"``: a frame without the label is dropped by
  the reader, never decoded. Multi-task reads with ``"empty"`` and pads missing labels.
- Resampling: frames are resized (bilinear, antialiased: what torchvision's ``Resize`` in the wds
  and files kinds does) only when the split's frames are not all ``image_size`` square, as the
  manifest's ``frame_sizes`` say; training then rotates with one ``warp_affine`` at that size.
  Train and eval see the same resampling of a frame, and a pack whose frames differ in size works
  everywhere. The flip is the ``mirror`` of the normalize that runs anyway. Every batch's frame
  sizes (read from the JPEG headers, on the CPU) must be sizes the manifest lists, else a
  DataError names the pack: a manifest that lies about them would skip a needed resize.
- Output is HWC, so ``permute(0, 3, 1, 2)`` gives the NCHW channels_last view without a copy.
  dali-cpu feeding a GPU ships uint8 (a quarter of float32's bytes) through pinned memory and
  normalizes on the GPU; on the CPU it normalizes in DALI as before.
- Order (training): each epoch the reader draws a new order of the tars (``shuffle_after_epoch``,
  seeded from the run's seed, the same on every rank); each rank reads its own contiguous part of
  that sequence (``shard_id``/``num_shards``; DALI keeps a rank on its part in this mode) and takes
  each next sample at random from a buffer of ``shuffle_buffer`` samples (``random_shuffle``,
  ``initial_fill``, seeded from the run's seed and the rank). The buffer never mixes epochs (DALI's
  ``loader.h`` keeps one region per epoch), so each epoch holds every sample once across ranks.
  Augmentation draws from seeds of its own per rank. Evaluation reads in stored order.
- Epochs: the pipeline is built once per loader and runs epoch after epoch. DALI pads every rank's
  part to the same number of batches by repeating its last sample (``pad_last_batch``). This
  loader counts the batches itself: it takes every batch of DALI's epoch, yields the real ones
  (training: the first ``len(self)``, all full; evaluation: the rank's share, the last partial)
  and drops the rest, so no padding is ever yielded or carried into the next epoch.
  ``state_dict()`` holds DALI's checkpoint at an epoch boundary (the reader's epoch and random
  state), so ``--resume`` continues the exact sequence without replaying epochs.
- Hand-over: each batch is fetched with ``Pipeline.share_outputs``; on the GPU bound to torch's
  current stream, so that stream waits for this batch alone (not for the end of DALI's queue) and
  the host does not wait. torch takes DALI's buffers through DLPack without a copy: with DALI's
  default (dynamic) executor ``release_outputs`` does not invalidate outputs still held
  (``pipeline.py``), so the executor is checked to be that one. Expectations from the sources;
  only a run on a GPU node proves them (the ``gpu`` tests, ``affectfast doctor``).
- Failures: a DALI error whose reason is the data (a JPEG that does not decode, an index unlike
  its tar) is a DataError naming the pack; out of memory, CUDA, nvImageCodec/nvJPEG and driver
  failures are a :class:`LoaderFailure` that says which.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from affectfast.batch import Batch
from affectfast.config import AugmentSpec
from affectfast.errors import DataError, SystemFailure
from affectfast.loaders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochLoader,
    LoaderConfig,
    batch_labels,
    epoch_seed,
    finish_batch,
    rank_share,
    stream_seed,
)
from affectfast.shards import (
    KEY_RULE,
    MANIFEST,
    Shard,
    check_key,
    frame_sizes,
    sample_counts,
    split_shards,
)
from affectfast.tasks import IMAGE_EXT, LABEL_DTYPE, LABEL_EXT, LABEL_SIZE, VA_IGNORE, split_member

READER = "reader"
# Sentinels that fn.pad writes where a multi-task sample lacks a label; no valid label equals them.
SENTINEL = {"va": VA_IGNORE, "expr": 255, "au": 255}
DALI_LABEL_TYPE = {np.dtype("<f4"): types.FLOAT, np.dtype("u1"): types.UINT8}
DALI_INTERP = {"nearest": types.INTERP_NN, "linear": types.INTERP_LINEAR}
# nvJPEG's buffers per decoder thread, bytes per pixel of the frames they must hold: DALI's ImageNet
# example (docs/examples/use_cases/pytorch/resnet50/main.py) preallocates 211,025,920 B of device
# and 140,544,512 B of pinned host memory for ImageNet's largest image, 5980 x 6430 pixels.
DEVICE_BYTES_PER_PIXEL = 211_025_920 / (5980 * 6430)  # about 5.5
HOST_BYTES_PER_PIXEL = 140_544_512 / (5980 * 6430)  # about 3.7
# The buffers and the hardware decoder's preallocation cover this share of the split's frames; a
# larger frame makes nvJPEG grow its buffer once (a reallocation, not a failure).
FRAME_PERCENTILE = 0.999
MIN_TENSOR_BYTES = 4096  # the reader's smallest first allocation per component
MAX_REASON = 400  # characters of DALI's reason quoted in an error


@dataclass(frozen=True)
class Geometry:
    """What the split's frames need to become ``image_size`` squares (from the manifest)."""

    image_size: int
    resize: bool  # some frame is not image_size x image_size
    sizes: frozenset[tuple[int, int]]  # every (height, width) the manifest lists for the split
    typical: tuple[int, int]  # (height, width) covering FRAME_PERCENTILE of the split's frames

    @property
    def device_padding(self) -> int:
        """nvJPEG's device buffer per decoder thread, bytes (``device_memory_padding``)."""
        return math.ceil(DEVICE_BYTES_PER_PIXEL * self.typical[0] * self.typical[1])

    @property
    def host_padding(self) -> int:
        """nvJPEG's pinned host buffers per decoder thread, bytes (``host_memory_padding``)."""
        return math.ceil(HOST_BYTES_PER_PIXEL * self.typical[0] * self.typical[1])


@dataclass(frozen=True)
class Order:
    """How a training reader draws each epoch's order (docs in the module docstring)."""

    buffer: int  # samples the next one is drawn from (initial_fill)
    tar_seed: int  # the order of the tars: the same on every rank (shuffle_after_epoch_seed)
    sample_seed: int  # the draws from the buffer: this rank's


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
    order: Order | None,
    with_keys: bool,
    augment_seed: int,
    gpu_decoder: dict | None = None,
    out_dtype=types.FLOAT,
    decode_only: bool = False,
    dont_use_mmap: bool = False,
    read_ahead: bool = False,
    tensor_init_bytes: int = 1 << 20,
    fixed_angle: float | None = None,
):
    """Decode, augment and normalize one batch of frames; outputs (images, *labels, frame sizes
    [, keys]). ``order`` None reads in stored order (evaluation); ``augment_seed`` is this rank's
    (the flip and the angle derive their own seeds from it); ``fixed_angle``: see ``_geometry``."""
    exts = [IMAGE_EXT] + [LABEL_EXT[t] for t in tasks]
    shuffle = {}
    if order is not None:
        # A new order of the tars each epoch, the same on every rank; the next sample drawn from a
        # buffer of order.buffer samples. DALI refuses stick_to_shard=True with
        # shuffle_after_epoch, and keeps each rank on its own part anyway (its reader_meta says
        # stick_to_shard), which DaliLoader checks.
        shuffle = dict(
            shuffle_after_epoch=True,
            shuffle_after_epoch_seed=order.tar_seed,
            random_shuffle=True,
            initial_fill=order.buffer,
            seed=order.sample_seed,
        )
    outputs = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=exts,
        name=READER,
        dtypes=[types.UINT8] + [DALI_LABEL_TYPE[LABEL_DTYPE[t]] for t in tasks],
        missing_component_behavior="skip" if len(tasks) == 1 else "empty",
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=order is None,
        pad_last_batch=True,
        dont_use_mmap=dont_use_mmap,
        read_ahead=read_ahead,
        tensor_init_bytes=tensor_init_bytes,
        **shuffle,
    )
    # One component (the test split's image alone) comes back as a node, several as a list.
    jpegs, *labels = outputs if isinstance(outputs, list | tuple) else [outputs]
    # The GPU-only lines: nvJPEG (the hardware decoder takes hw_decoder_load of the images where
    # the GPU has one; affine, jpeg_fancy_upsampling: gpu_decoder), its buffers and the hardware
    # decoder's preallocation sized for the split's frames (Geometry), not for ImageNet's.
    decode_args = (
        dict(
            device="mixed",
            preallocate_width_hint=geometry.typical[1],
            preallocate_height_hint=geometry.typical[0],
            device_memory_padding=geometry.device_padding,
            host_memory_padding=geometry.host_padding,
            **(gpu_decoder or {}),
        )
        if gpu
        else dict(device="cpu")
    )
    images = fn.decoders.image(jpegs, output_type=types.RGB, **decode_args)
    if decode_only:
        return (images,)
    images, flip = _geometry(images, geometry, augment, augment_seed, fixed_angle)
    normalized = out_dtype != types.UINT8  # uint8: flip only, normalized after the copy
    images = fn.crop_mirror_normalize(
        images,
        mirror=flip,
        dtype=out_dtype,
        output_layout="HWC",
        mean=[255 * m for m in IMAGENET_MEAN] if normalized else [0.0],
        std=[255 * s for s in IMAGENET_STD] if normalized else [1.0],
    )
    rest = [
        fn.pad(label, fill_value=SENTINEL[t], shape=[LABEL_SIZE[t]])
        for t, label in zip(tasks, labels)
    ]
    if gpu:
        # GPU-only: labels travel with the images (in the graph, not as several small pageable
        # copies per step); the masks are then computed on the GPU (_to_batch).
        rest = [label.gpu() for label in rest]
    # (height, width, channels) from the JPEG header, as pack read it (no EXIF turn): on the CPU.
    rest.append(fn.peek_image_shape(jpegs, adjust_orientation=False))
    if with_keys:
        # "<tar>:<offset>:<key>.jpg" as bytes, zero-padded to the batch's longest (stays on the CPU).
        rest.append(fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0))
    return (images, *rest)


def _geometry(
    images, geometry: Geometry, augment: AugmentSpec | None, seed: int, fixed_angle: float | None
):
    """Resize where the frames need it, then rotate for training; returns (images, flip or 0).

    ``fixed_angle`` (degrees) rotates every frame by that angle instead of a random one: pixel
    checks compare kinds under a rotation they can predict.
    """
    size = geometry.image_size
    flip = 0
    if augment is not None and augment.flip:
        flip = fn.random.coin_flip(probability=0.5, seed=stream_seed(seed, "flip"))
    if geometry.resize:
        # torchvision's Resize (bilinear, antialiased): what wds/files do, on train and eval alike.
        images = fn.resize(
            images, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR
        )
    if fixed_angle is not None:
        angle = float(fixed_angle)
    elif augment is None or augment.degrees == 0:
        return images, flip
    else:
        angle = fn.random.uniform(
            range=[-augment.degrees, augment.degrees], seed=stream_seed(seed, "angle")
        )
    interpolation = augment.interpolation if augment is not None else "linear"
    # Rotation about the centre, source -> destination (inverse_map=False). Pixel centres sit at
    # +0.5, so [-1 0 W; 0 1 0] is an exact flip and the identity an exact copy (checked in tests).
    matrix = fn.transforms.rotation(angle=angle, center=[size / 2, size / 2])
    images = fn.warp_affine(
        images,
        matrix=matrix,
        size=[size, size],
        inverse_map=False,
        fill_value=0,
        interp_type=DALI_INTERP[interpolation],
    )
    return images, flip


def split_geometry(config: LoaderConfig) -> Geometry:
    """The resampling the split needs, from the frame sizes the manifest records."""
    sizes = frame_sizes(config.shards, config.split)
    square = (config.image_size, config.image_size)
    typical = (
        (_percentile(sizes, 0, FRAME_PERCENTILE), _percentile(sizes, 1, FRAME_PERCENTILE))
        if sizes
        else square
    )
    return Geometry(config.image_size, set(sizes) != {square}, frozenset(sizes), typical)


def _percentile(sizes: dict[tuple[int, int], int], axis: int, q: float) -> int:
    """The ``q`` quantile of the frames' heights (axis 0) or widths (1), weighted by count."""
    values = sorted((size[axis], count) for size, count in sizes.items())
    total, seen = sum(count for _, count in values), 0
    for value, count in values:
        seen += count
        if seen >= q * total:
            return value
    return values[-1][0]


def build_pipeline(
    config: LoaderConfig,
    shards: list[Shard],
    *,
    decode_only: bool = False,
    checkpoint: str | None = None,
    prefetch: int = 2,
    fixed_angle: float | None = None,
):
    """This rank's DALI pipeline over ``shards``, built, ready to run epoch after epoch.

    ``checkpoint``: a ``state_dict()["dali"]`` to continue from (checkpointing is on for training).
    ``fixed_angle``: rotate every frame by this many degrees (see ``_geometry``).
    """
    gpu = config.kind == "dali-gpu"
    # fp16 straight out of the normalize on the GPU; on the CPU DALI's fp16 conversion was slower
    # than its float32 normalize, so the CPU casts in torch (finish_batch) instead.
    out_dtype = types.FLOAT16 if gpu and config.dtype == torch.float16 else types.FLOAT
    if ships_uint8(config):
        out_dtype = types.UINT8
    order = None
    if config.shuffle:
        order = Order(
            buffer=config.shuffle_buffer,
            tar_seed=stream_seed(config.seed, "tar order"),  # one epoch order for all ranks
            sample_seed=stream_seed(config.seed, "sample order", config.rank),
        )
    pipe = affect_pipeline(
        [str(s.tar) for s in shards],
        [str(s.idx) for s in shards],
        config.label_tasks,
        split_geometry(config),
        config.augment,
        gpu,
        config.rank,
        config.world_size,
        order,
        config.with_keys,
        stream_seed(config.seed, "augment", config.rank),
        dict(
            hw_decoder_load=config.hw_decoder_load,
            affine=config.decoder_affine,
            jpeg_fancy_upsampling=config.fancy_upsampling,
        ),
        out_dtype,
        decode_only,
        config.dont_use_mmap,
        config.read_ahead,
        _tensor_init_bytes(shards),
        fixed_angle,
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        device_id=(config.device.index or 0) if gpu else None,
        seed=epoch_seed(config.seed, 0, config.rank),
        prefetch_queue_depth=prefetch,
        enable_checkpointing=config.shuffle and not decode_only,
        checkpoint=checkpoint,
    )
    pipe.build()
    return pipe


def ships_uint8(config: LoaderConfig) -> bool:
    """dali-cpu feeding a GPU: uint8 out of DALI, normalized on the GPU (finish_batch)."""
    return config.kind == "dali-cpu" and config.device.type == "cuda"


def _tensor_init_bytes(shards: list[Shard]) -> int:
    """The reader's first allocation per component, bytes: four times the mean JPEG, rather than
    DALI's 1 MiB (a copying reader, --dont-use-mmap, keeps it for each buffered sample)."""
    samples = sum(s.samples for s in shards)
    mean = sum(s.jpeg_bytes for s in shards) / max(samples, 1)
    return max(MIN_TENSOR_BYTES, 4 * math.ceil(mean))


class LoaderFailure(SystemFailure):
    """DALI stopped for a reason that is not the data: out of memory, CUDA, nvImageCodec/nvJPEG,
    the driver. The message says which, in one line."""


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
        self.geometry = split_geometry(config)
        # Frame sizes the manifest lists, as height << 16 | width (the per-batch check).
        self._size_codes = torch.tensor(sorted(h << 16 | w for h, w in self.geometry.sizes))
        self._names = ["images", *config.label_tasks, "sizes"] + (
            ["keys"] if config.with_keys else []
        )
        self.pipe = None  # the built pipeline, kept across epochs
        self._checkpoint = None  # DALI state to build from (load_state_dict)
        self._in_epoch = False
        self._dali_batches = 0  # batches in one of DALI's epochs on this rank, padding included

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
            state["dali"] = self.pipe.checkpoint() if self.pipe is not None else self._checkpoint
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of the same run (same settings and rank)."""
        self.pipe = None
        self.epoch, self._checkpoint = int(state["epoch"]), state.get("dali")

    def __iter__(self):
        try:
            yield from self._epoch()
            return
        except DataError:
            self.pipe = None  # destroyed now: its traceback must not keep the pipeline alive
            raise
        except RuntimeError as error:
            if "pipeline" not in str(error):  # not DALI's: a bug, keep its traceback
                self.pipe = None
                raise
            failure = dali_failure(error, self.shards, self.config.shards)
        self.pipe = None  # a failed pipeline is never reused
        # Raised outside the handler, so it holds no reference to DALI's error, whose traceback
        # keeps the failed pipeline alive (a DataLoader forked meanwhile would hang destroying it).
        raise failure

    def _epoch(self):
        if self.pipe is None or self._in_epoch:  # first epoch, or the last was abandoned
            self._open()
        self._in_epoch = True
        c = self.config
        share = rank_share(self.samples, c.rank, c.world_size)  # this rank's real samples
        for index in range(self._dali_batches):
            outputs = self._next_outputs()
            if index < len(self):
                yield self._to_batch(outputs, min(c.batch_size, share - index * c.batch_size))
        self._in_epoch = False
        self.epoch += 1

    def _open(self) -> None:
        c = self.config
        self.pipe = build_pipeline(c, self.shards, checkpoint=self._checkpoint)
        meta = self.pipe.reader_meta(READER)
        if meta["epoch_size"] != self.samples:
            raise DataError(
                c.shards / MANIFEST,
                f"lists {self.samples} {c.split} samples with {','.join(c.label_tasks) or 'images'}"
                f", but DALI's reader finds {meta['epoch_size']} in the shards' indexes; "
                "run affectfast verify",
            )
        # What the epoch arithmetic rests on (DALI 2.4): each rank reads its own part every epoch
        # (rank_share samples), and outputs stay valid while torch holds them.
        if not meta["stick_to_shard"] or not self.pipe.exec_dynamic:
            raise LoaderFailure(
                "this DALI moves ranks across parts between epochs or reuses output buffers "
                f"(reader_meta {meta}, exec_dynamic {self.pipe.exec_dynamic}): unsupported"
            )
        self._dali_batches = -(-(meta["epoch_size_padded"] // c.world_size) // c.batch_size)
        self.pipe.schedule_run()  # fills the prefetch queue
        self._in_epoch = False

    def _next_outputs(self) -> dict[str, torch.Tensor]:
        """The next batch as torch tensors sharing DALI's buffers; schedules the one after.

        GPU: the outputs are bound to torch's current stream, which then waits for this batch's
        work alone; the host does not wait. The sizes are checked (CPU) before the images are
        taken, which must be of one shape.
        """
        stream = torch.cuda.current_stream(self.config.device) if self._gpu else None
        outputs = dict(zip(self._names, self.pipe.share_outputs(cuda_stream=stream)))
        sizes = torch.from_dlpack(outputs["sizes"].as_tensor())
        self._check_sizes(sizes)
        tensors = {name: torch.from_dlpack(out.as_tensor()) for name, out in outputs.items()}
        self.pipe.release_outputs()  # the executor may reuse nothing torch still holds
        self.pipe.schedule_run()
        return tensors

    @property
    def _gpu(self) -> bool:
        return self.config.kind == "dali-gpu"

    def _check_sizes(self, sizes: torch.Tensor) -> None:
        """Every frame of a batch must have a size the manifest lists for the split."""
        codes = sizes[:, 0] << 16 | sizes[:, 1]
        unknown = ~torch.isin(codes, self._size_codes)
        if not unknown.any():
            return
        height, width = sizes[int(unknown.nonzero()[0])][:2].tolist()
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(self.geometry.sizes)[:6])
        raise DataError(
            self.config.shards / MANIFEST,
            f"a {self.config.split} frame is {height}x{width}, a size its frame_sizes do not list "
            f"({listed}): the manifest does not describe its shards; run affectfast verify "
            "(or pack again)",
        )

    def _to_batch(self, out: dict[str, torch.Tensor], keep: int) -> Batch:
        if keep < len(out["images"]):  # a partial last batch: the rest is DALI's padding
            out = {name: value[:keep] for name, value in out.items()}
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
        c = self.config
        return finish_batch(
            out["images"], labels, masks, keys, c.device, c.dtype, pin=ships_uint8(c)
        )


# --- DALI's failures -------------------------------------------------------------------------------

MEMORY_ADVICE = "lower --batch-size or --num-threads, or free the GPU"
QUOTED = re.compile(r'"[^"]*"')
# DALI's texts for failures that are not the data (include/dali/core/cuda_error.h: CUDAError and
# CUDABadAlloc; std::bad_alloc), each with what the user is told, checked in this order.
SYSTEM_FAILURES = (
    (
        ("std::bad_alloc", "bytes on host", "Cannot allocate memory"),
        "the host ran out of memory",
        "lower --batch-size or --num-threads, or free memory",
    ),
    (
        (
            "bytes on device",
            "cudaErrorMemoryAllocation",
            "CUDA_ERROR_OUT_OF_MEMORY",
            "CUDA allocation failed",
            "out of memory",
        ),
        "the GPU ran out of memory",
        MEMORY_ADVICE,
    ),
    (
        (
            "cudaErrorInsufficientDriver",
            "cudaErrorSystemDriverMismatch",
            "cudaErrorNoDevice",
            "CUDA_ERROR_NO_DEVICE",
            "CUDA_ERROR_NOT_INITIALIZED",
            "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
            "CUDA driver version",
            "CUDA driver is",
            "CUDA driver!",
            "initialize CUDA driver",
            "libcuda",
            "CUDA-capable",
        ),
        "a CUDA driver problem",
        "check the driver (nvidia-smi) and that this process sees the GPU",
    ),
    (
        ("CUDA runtime API error", "CUDA driver API error", "cudaError", "CUDA_ERROR"),
        "a CUDA error",
        "the GPU or its driver failed; `affectfast doctor` checks the node",
    ),
)
# nvImageCodec's status in DALI's "nvImageCodec failure: '#N'" (nvimgcodec.h nvimgcodecStatus_t):
# the image itself is bad (BAD_CODESTREAM, CODESTREAM_UNSUPPORTED and their extension twins,
# INCOMPLETE_BITSTREAM); any other status is the decoder's own failure (allocator, execution,
# architecture, internal, missing dependency).
CODEC_FAILURE = re.compile(r"nvImageCodec failure: '#(\d+)'")
CODEC_DATA_STATUS = {3, 4, 13, 14, 19}
CODEC_MEMORY_STATUS = {5, 15}
# DALI's texts for a sample that cannot be read or decoded (webdataset_loader.cc, image_decoder.h).
DATA_FAILURES = (
    "Malformed index file",
    "Error in index file",
    "component size and dtype incompatible",
    "Error reading from a file",
    "Failed to decode sample",
)


def dali_failure(error: RuntimeError, shards: list[Shard], folder: Path) -> Exception:
    """What to raise for DALI's ``error``: a DataError where the data is the reason (naming the
    shards, or the file DALI names), else a LoaderFailure saying what failed."""
    reason = _reason(error)
    codec = CODEC_FAILURE.search(reason)
    status = int(codec.group(1)) if codec else None
    if status in CODEC_DATA_STATUS or any(text in reason for text in DATA_FAILURES):
        return _unreadable(shards, folder, reason)
    if status in CODEC_MEMORY_STATUS:
        return _system_failure(folder, reason, "the decoder ran out of memory", MEMORY_ADVICE)
    unquoted = QUOTED.sub("", reason)  # a path such as /data/driver/... says nothing
    for needles, what, advice in SYSTEM_FAILURES:
        if any(needle in unquoted for needle in needles):
            return _system_failure(folder, reason, what, advice)
    what = "an nvImageCodec (nvJPEG) failure" if codec else "a failure DALI did not explain"
    return _system_failure(
        folder,
        reason,
        what,
        f"if the pack may be damaged, `affectfast verify {folder} --decode` checks every sample",
    )


def _system_failure(folder: Path, reason: str, what: str, advice: str) -> LoaderFailure:
    return LoaderFailure(f"DALI stopped reading {folder}: {what} ({reason}); {advice}")


def _reason(error: RuntimeError) -> str:
    """DALI's reason in one line: the line after "encountered:", else the last meaningful one."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and "no longer valid" not in line]
    after = lines.index("encountered:") + 1 if "encountered:" in lines else len(lines) - 1
    reason = lines[after] if 0 <= after < len(lines) else "no reason given"
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


def _unreadable(shards: list[Shard], folder: Path, reason: str) -> DataError:
    """DALI's reader or decoder failed on a sample: name the file DALI names if it is one of the
    shards (its tar or .idx), else the shards, with DALI's reason in one line."""
    named = [f for s in shards for f in (s.tar, s.idx) if str(f) in reason]
    names = ", ".join(s.tar.name for s in shards[:3])
    names += f" and {len(shards) - 3} more" if len(shards) > 3 else ""
    where = named[0] if named else shards[0].tar if len(shards) == 1 else folder
    return DataError(
        where,
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
