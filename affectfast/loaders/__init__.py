"""build_loader: one contract, four kinds (dali-gpu, dali-cpu, wds, files). See docs/design.md §3.

Every kind yields :class:`affectfast.batch.Batch` and follows the same epoch rules (``base.py``), so
swapping the kind never changes what the trainer sees, only how fast it comes. Each kind lives in
its own module (``dali.py``, ``wds.py``, ``files.py``) and is imported only when built: a ``wds``
user never loads DALI, and a DALI user never forks DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from affectfast.batch import Batch
from affectfast.config import AugmentSpec
from affectfast.constants import LOADER_KINDS
from affectfast.loaders.base import SHUFFLE_BUFFER, LoaderConfig, screen_labels
from affectfast.tasks import parse_tasks

__all__ = ["LOADER_KINDS", "AugmentSpec", "Loader", "LoaderConfig", "build_loader", "screen_labels"]


class Loader(Protocol):
    """What build_loader returns: iterate it once per epoch."""

    config: LoaderConfig  # the resolved settings it was built with
    samples: int  # samples per epoch, all ranks together
    epoch: int  # the next epoch to run

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...  # batches per epoch on this rank
    def set_epoch(self, epoch: int) -> None: ...  # the epoch about to run (DALI: the next only)
    def state_dict(self) -> dict: ...  # where it stands at an epoch boundary (for --resume)
    def load_state_dict(self, state: dict) -> None: ...  # continue from state_dict()


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
    hw_decoder_load: float = 0.65,  # dali-gpu: share for the hardware JPEG decoder (DALI's default)
    decoder_affine: bool = True,  # dali-gpu: pin decoder threads to cores (DALI's default)
    fancy_upsampling: bool = False,  # dali-gpu: chroma upsampling as the CPU decoder does it
    dont_use_mmap: bool = False,  # DALI kinds: plain file reads instead of mmap (shared filesystems)
    read_ahead: bool = False,  # DALI kinds: read each tar ahead on first access
    shuffle_buffer: int = SHUFFLE_BUFFER,  # training: samples each epoch's order is drawn from
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
        hw_decoder_load=hw_decoder_load,
        decoder_affine=decoder_affine,
        fancy_upsampling=fancy_upsampling,
        dont_use_mmap=dont_use_mmap,
        read_ahead=read_ahead,
        shuffle_buffer=shuffle_buffer,
    )
    # Imported here so a wds user never loads DALI, and a DALI user never forks DataLoader workers.
    if kind in ("dali-gpu", "dali-cpu"):
        from affectfast.loaders.dali import DaliLoader

        return DaliLoader(config)
    if kind == "wds":
        from affectfast.loaders.wds import WdsLoader

        return WdsLoader(config)
    from affectfast.loaders.files import FilesLoader

    return FilesLoader(config)
