"""build_loader: one contract, four kinds (dali-gpu, dali-cpu, wds, files). See DESIGN.md §3.

(SKELETON: the signature and AugmentSpec below are the contract the trainer codes against; the body
is being written.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from affectfast.batch import Batch

LOADER_KINDS = ("dali-gpu", "dali-cpu", "wds", "files")


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation shared by every loader kind; ``None`` instead of a spec means off."""

    flip: bool = True               # random horizontal flip with p = 0.5
    degrees: float = 10.0           # random rotation, uniform in [-degrees, +degrees]
    interpolation: str = "nearest"  # "nearest" (torchvision RandomRotation's default) or "linear"


class Loader(Protocol):
    """What build_loader returns: iterate it once per epoch."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...              # batches per epoch on this rank
    def set_epoch(self, epoch: int) -> None: ...  # reshuffle deterministically from (seed, epoch)


def build_loader(
    kind: str,
    shards: Path,                   # a pack output folder (manifest.json + tars + idx)
    split: str,                     # "train" or "val"
    tasks: tuple[str, ...],         # non-empty subset of TASKS, canonical order
    batch_size: int,
    *,
    image_size: int = 112,
    augment: AugmentSpec | None = None,
    shuffle: bool | None = None,    # default: True for train, False for val
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_keys: bool = False,
    drop_last: bool | None = None,  # default: True for train (equal batches on all ranks), False for val
    seed: int = 0,
    num_threads: int = 2,           # DALI threads / DataLoader workers
    tree: Path | None = None,       # the raw Aff-Wild2 root, needed by kind="files" only
) -> Loader:
    """Build a loader of ``Batch`` for one split and task set."""
    raise NotImplementedError
