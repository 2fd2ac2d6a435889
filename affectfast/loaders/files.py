"""The ``files`` loader: the baseline, as the seed study read Aff-Wild2.

Annotations are parsed at start (``affwild2.read_tree``), then a torch ``Dataset`` opens one JPEG
file per sample with PIL and applies the torchvision transforms that ``wds`` uses, behind a
``DataLoader``. One Dataset serves every split and task set (the seed had one copy per task).

Same epoch rules as the other kinds (``affectfast.loaders.base``): the same samples (uni-task: frames with
that label; multi-task: every frame with any label, masks per task), ranks take contiguous disjoint
parts of an order that training draws from (seed, epoch) on every rank alike (so the ranks' parts
change each epoch but never overlap), training yields ``len(loader)`` full batches on every rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from affectfast.affwild2 import (
    find_annotation_dirs,
    fingerprint_source,
    image_path,
    read_tree,
    sample_key,
    test_videos,
)
from affectfast.errors import DataError
from affectfast.loaders.base import (
    EpochLoader,
    LoaderConfig,
    WorkerError,
    collate_examples,
    collect_before_fork,
    epoch_seed,
    finish_batch,
    raise_worker_error,
    rank_range,
    torch_transform,
    worker_init,
)
from affectfast.shards import MANIFEST, load_manifest
from affectfast.tasks import TASKS, valid_mask


class FramesDataset(torch.utils.data.Dataset):
    """One item per kept frame: ``(key, image CHW float, {task: label array or None})``.

    The test split has no annotation: its videos are those the test lists of the pack in
    ``shards`` name (its manifest), every frame with an image, no label.
    """

    def __init__(
        self, tree: Path, split: str, tasks: tuple[str, ...], transform, shards: Path | None = None
    ):
        dirs = find_annotation_dirs(tree)
        # Every task the tree has, so multi-task keeps the frames the pack keeps (any valid label).
        every = read_tree(dirs, TASKS)
        if split == "test":
            videos = _test_videos(dirs, shards)
        else:
            videos = [v for v in every if v.split == split]
        # What pack records as manifest["source"]["fingerprint"]: annotation bytes, the frame
        # names of every packed video (test videos too) and each task's test list.
        lists = load_manifest(shards)["splits"].get("test", {}).get("lists") or {}
        names = {v.name for v in every} | {name for listed in lists.values() for name in listed}
        self.fingerprint = fingerprint_source(dirs, sorted(names), lists or None)
        self.frames_dir, self.tasks, self.transform = dirs.frames, tasks, transform
        self.names = [v.name for v in videos]
        keep = [
            valid_mask(tasks[0], getattr(v, tasks[0]))
            if len(tasks) == 1 and split != "test"
            else np.ones(len(v), dtype=bool)
            for v in videos
        ]
        if not videos:
            raise DataError(tree, f"no {split} video with annotations in this tree")
        self.video = np.concatenate([np.full(k.sum(), i, np.int32) for i, k in enumerate(keep)])
        self.frame = np.concatenate([v.frames[k] for v, k in zip(videos, keep)])
        self.labels = {
            t: np.concatenate([getattr(v, t)[k] for v, k in zip(videos, keep)]) for t in tasks
        }
        self.valid = {t: valid_mask(t, column) for t, column in self.labels.items()}

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> tuple:
        name, frame = self.names[self.video[i]], int(self.frame[i])
        path = image_path(self.frames_dir, name, frame)
        try:
            with Image.open(path) as image:
                pixels = image.convert("RGB")
        except OSError as error:
            raise DataError(path, f"cannot read frame image: {error}") from None
        labels = {t: self.labels[t][i] if self.valid[t][i] else None for t in self.tasks}
        return sample_key(name, frame), self.transform(pixels), labels

    def __getitems__(self, indices: list[int]) -> list:
        """A batch's items (what DataLoader workers call); a DataError becomes ``[WorkerError]``."""
        try:
            return [self[i] for i in indices]
        except DataError as error:
            return [WorkerError(error)]


def _test_videos(dirs, shards: Path | None) -> list:
    """The test videos of the pack in ``shards``: its manifest names them, per task."""
    lists = load_manifest(shards).get("splits", {}).get("test", {}).get("lists")
    if not lists:
        raise DataError(shards / MANIFEST, "no test split: pack the tree with --test-videos")
    where = shards / MANIFEST
    return test_videos(
        dirs, {t: (where, [(n, None) for n in names]) for t, names in lists.items()}
    )[0]


class FilesLoader(EpochLoader):
    """``files``: iterate once per epoch; see the module docstring."""

    def __init__(self, config: LoaderConfig):
        self.dataset = FramesDataset(
            config.tree,
            config.split,
            config.tasks,
            torch_transform(config.image_size, config.augment),
            config.shards,
        )
        _check_source(config.shards, config.tree, self.dataset.fingerprint)
        super().__init__(config, len(self.dataset), config.tree)

    def _indices(self) -> list[int]:
        c = self.config
        order = np.arange(self.samples)
        if c.shuffle:  # the same permutation on every rank, then each takes its own slice
            order = np.random.default_rng(epoch_seed(c.seed, self.epoch)).permutation(self.samples)
        lo, hi = rank_range(self.samples, c.rank, c.world_size)
        return order[lo:hi].tolist()

    def __iter__(self):
        c = self.config
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=c.batch_size,
            sampler=self._indices(),
            drop_last=c.drop_last,
            num_workers=c.num_threads,
            worker_init_fn=worker_init,
            collate_fn=self._collate,
            prefetch_factor=4,
            pin_memory=c.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed(c.seed, self.epoch, c.rank)),
        )
        collect_before_fork()
        batches = iter(loader)  # owns the worker processes
        try:
            for _, item in zip(range(len(self)), batches):
                keys, images, labels, masks = raise_worker_error(item)
                yield finish_batch(
                    images, labels, masks, keys if c.with_keys else None, c.device, c.dtype
                )
        finally:
            del batches  # stop the workers now, even while an error's traceback holds this frame
        self.epoch += 1  # a finished pass: state_dict() names the next epoch, as DALI's does

    def _collate(self, examples: list) -> tuple | WorkerError:
        if isinstance(examples[0], WorkerError):
            return examples[0]
        return collate_examples(examples, self.config.tasks)


def _check_source(shards: Path, tree: Path, fingerprint: str) -> None:
    """The tree must be the one the shards were packed from (the manifest's source fingerprint):
    the files loader stands in for the shards, in benchmarks and training alike."""
    manifest = load_manifest(shards)
    packed = (manifest.get("source") or {}).get("fingerprint")
    if packed is None:
        raise DataError(shards / MANIFEST, "no source fingerprint to check --tree against")
    if packed != fingerprint:
        raise DataError(
            tree,
            f"is not the tree {shards} was packed from (its annotation files or frame names "
            "differ from the manifest's source fingerprint); pass the --tree that was packed, "
            "or pack this one",
        )
