"""The DALI loaders (``dali-gpu``, ``dali-cpu``): one pipeline function, the device switched.

The graph, per sample (DESIGN.md §3):

    readers.webdataset ─▶ decoders.image ─▶ [warp_affine] ─▶ crop_mirror_normalize ─▶ HWC images
         │  (skip / empty)   (mixed | cpu)   one resampling      flip + normalize + dtype
         └─▶ labels ─▶ pad to a fixed shape with a sentinel (the masks follow from it)

- Uni-task reads with ``missing_component_behavior="skip"``: a frame without the label is dropped by
  the reader, never decoded. Multi-task reads with ``"empty"`` and pads missing labels.
- Augmentation is ONE resampling pass: scale to ``image_size`` and rotation are one affine matrix
  per sample (``fn.transforms``) applied by one ``fn.warp_affine``; the flip is the ``mirror`` of the
  normalize that runs anyway. Without augmentation and at native size nothing is resampled.
- Output is HWC, so ``permute(0, 3, 1, 2)`` gives the NCHW channels_last view without a copy.
- Epochs: the pipeline is rebuilt for each epoch with a seed from (seed, epoch, rank). That makes an
  epoch's order a function of its number alone (``--resume`` replays it exactly), at the price of a
  pipeline build per epoch (well under a second, against minutes of epoch on the full data).
  The reader's ``shard_id``/``num_shards`` split the split into contiguous disjoint parts,
  ``pad_last_batch`` + ``DALIGenericIterator(reader_name=...)`` trim the padded last batch.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image

from affectfast.batch import Batch
from affectfast.config import AugmentSpec
from affectfast.errors import DataError
from affectfast.loaders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHUFFLE_BUFFER,
    EpochLoader,
    LoaderConfig,
    batch_labels,
    epoch_seed,
    epoch_shard_order,
    finish_batch,
)
from affectfast.shards import Shard, sample_counts, split_shards
from affectfast.tasks import IMAGE_EXT, LABEL_DTYPE, LABEL_EXT, LABEL_SIZE, VA_IGNORE, split_member

READER = "reader"
# Sentinels that fn.pad writes where a multi-task sample lacks a label; no valid label equals them.
SENTINEL = {"va": VA_IGNORE, "expr": 255, "au": 255}
DALI_LABEL_TYPE = {np.dtype("<f4"): types.FLOAT, np.dtype("u1"): types.UINT8}
DALI_INTERP = {"nearest": types.INTERP_NN, "linear": types.INTERP_LINEAR}


@pipeline_def
def affect_pipeline(
    tars: list[str],
    idxs: list[str],
    tasks: tuple[str, ...],
    image_size: int,
    native_size: tuple[int, int],
    augment: AugmentSpec | None,
    gpu: bool,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    with_keys: bool,
    out_dtype=types.FLOAT,
    decode_only: bool = False,
    dont_use_mmap: bool = False,
    read_ahead: bool = False,
):
    """Decode, augment and normalize one batch of frames; outputs (images, *labels[, keys])."""
    exts = [IMAGE_EXT] + [LABEL_EXT[t] for t in tasks]
    jpegs, *labels = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=exts,
        name=READER,
        dtypes=[types.UINT8] + [DALI_LABEL_TYPE[LABEL_DTYPE[t]] for t in tasks],
        missing_component_behavior="skip" if len(tasks) == 1 else "empty",
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,
        pad_last_batch=True,
        random_shuffle=shuffle,
        initial_fill=SHUFFLE_BUFFER,
        dont_use_mmap=dont_use_mmap,
        read_ahead=read_ahead,
    )
    # The GPU-only lines: nvJPEG (hardware decoder where present) and preallocated decode buffers.
    decode_args = (
        dict(
            device="mixed",
            hw_decoder_load=0.65,
            preallocate_width_hint=native_size[1],
            preallocate_height_hint=native_size[0],
        )
        if gpu
        else dict(device="cpu")
    )
    images = fn.decoders.image(jpegs, output_type=types.RGB, **decode_args)
    if decode_only:
        return (images,)
    images, flip = _augment(images, jpegs, image_size, native_size, augment)
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
    if with_keys:
        # "<tar>:<offset>:<key>.jpg" as bytes, zero-padded to the batch's longest.
        padded.append(fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0))
    return (images, *padded)


def _augment(
    images, jpegs, image_size: int, native_size: tuple[int, int], augment: AugmentSpec | None
):
    """The geometric part: at most one resampling; returns (images, per-sample flip or 0)."""
    rotate = augment is not None and augment.degrees > 0
    flip = fn.random.coin_flip(probability=0.5) if augment is not None and augment.flip else 0
    if not rotate:
        if native_size != (image_size, image_size):
            # torchvision's Resize (bilinear, antialiased): what wds/files do.
            images = fn.resize(
                images,
                size=[image_size, image_size],
                antialias=True,
                interp_type=types.INTERP_LINEAR,
            )
        return images, flip
    # Source -> destination: scale to image_size (per sample, from the JPEG header), then rotate
    # about the output centre; warp_affine inverts it (inverse_map=False). Pixel centres sit at
    # +0.5, so [-1 0 W; 0 1 0] is an exact flip and the identity an exact copy (checked in tests).
    shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.FLOAT)  # H, W, C
    scale = fn.transforms.scale(scale=float(image_size) / fn.stack(shape[1], shape[0]))
    angle = fn.random.uniform(range=[-augment.degrees, augment.degrees])
    matrix = fn.transforms.rotation(scale, angle=angle, center=[image_size / 2, image_size / 2])
    images = fn.warp_affine(
        images,
        matrix=matrix,
        size=[image_size, image_size],
        inverse_map=False,
        fill_value=0,
        interp_type=DALI_INTERP[augment.interpolation],
    )
    return images, flip


def native_size(shard: Shard) -> tuple[int, int]:
    """(height, width) of the first JPEG of a shard; Aff-Wild2's cropped-aligned frames share one."""
    offset, size = shard.first_jpeg
    with open(shard.tar, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except OSError as error:
        raise DataError(shard.tar, f"first JPEG at byte {offset} unreadable: {error}") from None
    return height, width


def build_pipeline(
    config: LoaderConfig,
    shards: list[Shard],
    epoch: int,
    *,
    decode_only: bool = False,
    prefetch: int = 2,
):
    """The DALI pipeline of one epoch on this rank (built, ready to run)."""
    gpu = config.kind == "dali-gpu"
    # fp16 straight out of the normalize on the GPU; on the CPU DALI's fp16 conversion was slower
    # than its float32 normalize, so the CPU casts in torch (finish_batch) instead.
    out_dtype = types.FLOAT16 if gpu and config.dtype == torch.float16 else types.FLOAT
    pipe = affect_pipeline(
        [str(s.tar) for s in shards],
        [str(s.idx) for s in shards],
        config.tasks,
        config.image_size,
        native_size(shards[0]),
        config.augment,
        gpu,
        config.rank,
        config.world_size,
        config.shuffle,
        config.with_keys,
        out_dtype,
        decode_only,
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        device_id=(config.device.index or 0) if gpu else None,
        seed=epoch_seed(config.seed, epoch, config.rank),
        prefetch_queue_depth=prefetch,
        dont_use_mmap=config.dont_use_mmap,
        read_ahead=config.read_ahead,
    )
    pipe.build()
    return pipe


class DaliLoader(EpochLoader):
    """``dali-gpu`` / ``dali-cpu``: iterate once per epoch; see the module docstring."""

    def __init__(self, config: LoaderConfig):
        self.shards = split_shards(config.shards, config.split)
        super().__init__(config, int(sample_counts(self.shards, config.tasks).sum()), config.shards)

    def pipeline(self, epoch: int = 0, *, decode_only: bool = False):
        """This loader's DALI pipeline of one epoch, built; benchmarks ``run()`` it bare.

        ``decode_only``: reader + decoder alone, same threads and batch size (the decode ceiling).
        """
        c = self.config
        order = epoch_shard_order(self.shards, c.seed, epoch, c.shuffle)
        return build_pipeline(c, order, epoch, decode_only=decode_only)

    def __iter__(self):
        c = self.config
        pipe = build_pipeline(
            c, epoch_shard_order(self.shards, c.seed, self.epoch, c.shuffle), self.epoch
        )
        names = ["images", *c.tasks] + (["keys"] if c.with_keys else [])
        policy = LastBatchPolicy.DROP if c.drop_last else LastBatchPolicy.PARTIAL
        batches = DALIGenericIterator(
            [pipe], names, reader_name=READER, last_batch_policy=policy, auto_reset=False
        )
        try:
            # Stop at len(self): with drop_last every rank yields the same count even though the
            # contiguous DALI shards differ by up to one sample.
            for _, outputs in zip(range(len(self)), batches):
                yield self._to_batch(outputs[0])
        finally:
            del batches, pipe

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        labels, masks = {}, {}
        for task in self.config.tasks:
            value = out[task]
            mask = value[:, 0] != SENTINEL[task]
            value = torch.where(mask[:, None], value, torch.zeros_like(value))
            labels[task] = batch_labels(task, value)
            masks[task] = mask
        keys = _decode_keys(out["keys"]) if self.config.with_keys else None
        return finish_batch(
            out["images"], labels, masks, keys, self.config.device, self.config.dtype
        )


def _decode_keys(source_info: torch.Tensor) -> list[str]:
    """Sample keys from zero-padded ``<tar>:<offset>:<video>/<NNNNN>.jpg`` source-info bytes."""
    keys = []
    for row in source_info.cpu().numpy():
        name = bytes(row).rstrip(b"\0").decode().rsplit(":", 1)[1]
        keys.append(split_member(name)[0])
    return keys
