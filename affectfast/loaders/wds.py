"""The ``wds`` loader: webdataset + torch DataLoader + torchvision v2 transforms.

What a user would write without DALI: PIL decoding and torchvision transforms in DataLoader worker
processes. It follows the same epoch rules as the DALI loaders (see ``affectfast.loaders.base``):

- Ranks split by *samples*, contiguously, exactly as DALI's ``shard_id``/``num_shards`` do: rank r
  keeps the filtered samples with global index in ``rank_range(N, r, world)``, and only opens the
  tars that overlap that range (known from the ``.idx`` files, no tar read needed). webdataset's
  ``split_by_node`` splits by whole tars instead, which gives ranks unequal sample counts (the last
  tar is short) and, with fewer tars than ranks, empty ranks; it reads the torch.distributed
  environment implicitly. Here the split is explicit and exact.
- Workers split the rank's tars (``split_by_worker``); each worker batches its own samples, and the
  main process merges the workers' partial last batches (``_rebatch``) so only the epoch's last
  batch can be partial, and training stops after ``len(loader)`` batches on every rank.
- The uni-task filter runs before ``decode``, so frames without the label are never decoded.
- Training shuffles the order of tars from (seed, epoch), so the workers' share of tars changes
  too, and each worker draws its samples from a buffer of ``shuffle_buffer`` samples seeded from
  the worker's seed (derived from (seed, epoch, rank) through the DataLoader generator).
- Every decoded frame's size must be one the manifest lists for the split (as the DALI kinds
  check), else a DataError names the pack.
- Bound for a GPU, the DataLoader pins its batches (page-locked memory), so the copy to the
  device runs asynchronously.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from webdataset.autodecode import DecodingError

from affectfast.errors import DataError
from affectfast.loaders.base import (
    EpochLoader,
    LoaderConfig,
    carry_errors,
    collate_examples,
    collect_before_fork,
    epoch_seed,
    finish_batch,
    raise_worker_error,
    rank_range,
    torch_transform,
    worker_init,
)
from affectfast.shards import (
    KEY_RULE,
    MANIFEST,
    check_key,
    frame_sizes,
    sample_counts,
    split_shards,
)
from affectfast.tasks import IMAGE_EXT, LABEL_EXT, decode_label


class WdsLoader(EpochLoader):
    """``wds``: iterate once per epoch; see the module docstring."""

    def __init__(self, config: LoaderConfig):
        self.shards = split_shards(config.shards, config.split)
        counts = sample_counts(self.shards, config.label_tasks)
        super().__init__(config, int(counts.sum()), config.shards)
        # Global index (among the samples this task set keeps) of each tar's first sample.
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        lo, hi = rank_range(self.samples, config.rank, config.world_size)
        self.offsets = {
            str(s.tar): int(start)
            for s, start, n in zip(self.shards, starts, counts)
            if n and start < hi and start + n > lo
        }
        self.range = (lo, hi)
        # What each tar must hold, from its index: sample count, first and last key.
        self.expected = {
            str(s.tar): (s.samples, s.first_key) for s in self.shards if str(s.tar) in self.offsets
        }
        self.sizes = FrameSizes(
            config.shards / MANIFEST, config.split, frame_sizes(config.shards, config.split)
        )

    def __iter__(self):
        c = self.config
        urls = list(self.offsets)
        if c.shuffle:
            random.Random(epoch_seed(c.seed, self.epoch)).shuffle(urls)
        workers = min(c.num_threads, len(urls))
        loader = torch.utils.data.DataLoader(
            self._dataset(urls),
            batch_size=None,
            num_workers=workers,
            worker_init_fn=worker_init,
            generator=torch.Generator().manual_seed(epoch_seed(c.seed, self.epoch, c.rank)),
            prefetch_factor=4 if workers else None,
            pin_memory=c.device.type == "cuda",
        )
        collect_before_fork()
        batches = iter(loader)  # owns the worker processes
        try:
            merged = _rebatch(map(raise_worker_error, batches), c.batch_size, len(self))
            for keys, images, labels, masks in merged:
                keys = keys if c.with_keys else None
                yield finish_batch(images, labels, masks, keys, c.device, c.dtype, pin=True)
        finally:
            del batches  # stop the workers now, even while an error's traceback holds this frame
        self.epoch += 1  # a finished pass: state_dict() names the next epoch, as DALI's does

    def _dataset(self, urls: list[str]) -> wds.DataPipeline:
        c = self.config
        stages = [
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            ReadShards(self.expected),
            RankPart(self.offsets, c.label_tasks, *self.range),
        ]
        if c.shuffle:
            stages.append(partial(_worker_shuffle, c.shuffle_buffer))
        stages += [
            wds.decode("pil", only=[IMAGE_EXT], handler=_decode_error),
            wds.map(self.sizes.check),
            wds.map(partial(_example, c.tasks, torch_transform(c.image_size, c.augment))),
            wds.batched(c.batch_size, collation_fn=partial(_collate, c.tasks), partial=True),
            carry_errors,  # a DataError reaches the main process as one (raise_worker_error)
        ]
        return wds.DataPipeline(*stages)


class ReadShards:
    """Stage: the samples of each tar, checked against its index as they are read.

    tarfile ends an archive silently at a damaged header, and a sample's key is whatever its tar
    header says: each tar must yield exactly the samples its .idx lists (their count, the first
    key), each key well-formed (``shards.check_key``), else a DataError names the tar.
    """

    def __init__(self, expected: dict[str, tuple[int, str]]):
        self.expected = expected

    def __call__(self, sources):
        for source in sources:
            url = source["url"]
            count, first = self.expected[url]
            seen, key = 0, None
            try:
                for sample in wds.tarfile_samples([source]):
                    key = sample["__key__"]
                    if not check_key(key):
                        raise DataError(url, f"member {key!r} is not a sample's: {KEY_RULE}")
                    if (seen == 0 and key != first) or seen == count:
                        break
                    seen += 1
                    yield sample
            except DataError:
                raise
            except Exception as error:  # tarfile's, or opening the file
                reason = str(error.args[0] if error.args else error).split(" @ ")[0]
                raise DataError(url, f"unreadable tar ({reason}); run affectfast verify") from None
            if seen != count:
                raise DataError(
                    url,
                    f"does not hold the samples its index lists ({count}, from {first}): "
                    f"read {seen}, up to {key}; a damaged tar or a stale .idx: run affectfast verify",
                )


class RankPart:
    """Stage: keep samples that carry the task (uni-task; ``tasks`` empty on the test split: every
    sample) and fall in this rank's [lo, hi)."""

    def __init__(self, offsets: dict[str, int], tasks: tuple[str, ...], lo: int, hi: int):
        self.offsets, self.lo, self.hi = offsets, lo, hi
        self.need = LABEL_EXT[tasks[0]] if len(tasks) == 1 else IMAGE_EXT

    def __call__(self, samples):
        url, index = None, 0
        for sample in samples:
            if sample["__url__"] != url:
                url, index = sample["__url__"], self.offsets[sample["__url__"]]
            if self.need not in sample:
                continue
            if self.lo <= index < self.hi:
                yield sample
            index += 1


def _example(tasks: tuple[str, ...], transform, sample: dict) -> tuple:
    try:
        labels = {
            t: decode_label(t, sample[LABEL_EXT[t]]) if LABEL_EXT[t] in sample else None
            for t in tasks
        }
    except ValueError as error:  # a component of the wrong length
        raise DataError(sample["__url__"], f"sample {sample['__key__']}: {error}") from None
    return sample["__key__"], transform(sample[IMAGE_EXT]), labels


def _decode_error(error: Exception) -> bool:
    """wds.decode's handler: an image that does not decode is a DataError naming tar and key."""
    if isinstance(error, DecodingError):
        raise DataError(
            error.url, f"{error.key}.{error.k}: cannot decode the image ({error.__cause__})"
        ) from None
    raise error


def _collate(tasks: tuple[str, ...], examples: list[tuple]) -> tuple:
    return collate_examples(examples, tasks)


def _worker_shuffle(buffer: int, samples):
    """Stage: buffer shuffle seeded from this DataLoader worker's seed (so from (seed, epoch))."""
    info = torch.utils.data.get_worker_info()
    seed = (info.seed if info is not None else torch.initial_seed()) % 2**32
    yield from wds.shuffle(buffer, initial=buffer, seed=seed)(samples)


@dataclass(frozen=True)
class FrameSizes:
    """Stage (after decode): a frame whose size the manifest does not list is a DataError naming
    the pack, as in the DALI kinds (which would otherwise skip a needed resize)."""

    manifest: Path
    split: str
    sizes: dict[tuple[int, int], int]

    def check(self, sample: dict) -> dict:
        image = sample[IMAGE_EXT]
        if (image.height, image.width) not in self.sizes:
            listed = ", ".join(f"{h}x{w}" for h, w in sorted(self.sizes)[:6])
            raise DataError(
                self.manifest,
                f"{self.split} frame {sample['__key__']} of {Path(sample['__url__']).name} is "
                f"{image.height}x{image.width}, a size its frame_sizes do not list ({listed}): the "
                "manifest does not describe its shards; run affectfast verify (or pack again)",
            )
        return sample


def _rebatch(batches, batch_size: int, limit: int):
    """Pass full batches through; merge the workers' partial ones; stop after ``limit`` batches."""
    yielded, pending = 0, []
    for batch in batches:
        if yielded == limit:
            return
        if len(batch[0]) == batch_size:
            yielded += 1
            yield batch
            continue
        pending.append(batch)
        while sum(len(p[0]) for p in pending) >= batch_size and yielded < limit:
            merged = _concat(pending)
            pending = [_slice(merged, batch_size, None)]
            yielded += 1
            yield _slice(merged, 0, batch_size)
    pending = [p for p in pending if len(p[0])]
    if pending and yielded < limit:
        yield _concat(pending)


def _concat(batches: list[tuple]) -> tuple:
    keys = [k for b in batches for k in b[0]]
    images = torch.cat([b[1] for b in batches])
    labels = {t: torch.cat([b[2][t] for b in batches]) for t in batches[0][2]}
    masks = {t: torch.cat([b[3][t] for b in batches]) for t in batches[0][3]}
    return keys, images, labels, masks


def _slice(batch: tuple, start: int, stop: int | None) -> tuple:
    keys, images, labels, masks = batch
    return (
        keys[start:stop],
        images[start:stop],
        {t: v[start:stop] for t, v in labels.items()},
        {t: v[start:stop] for t, v in masks.items()},
    )
