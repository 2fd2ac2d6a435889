"""A run folder: its file names, checkpoints (with RNG state) and per-epoch metrics records.

``OUT/config.json`` (the resolved TrainConfig), ``OUT/metrics.jsonl`` (one JSON object per epoch),
TensorBoard events under ``OUT/tb/``, ``OUT/last.pt`` (written atomically every epoch, what
``--resume`` continues from) and ``OUT/best.pt`` (highest val P_MTL). Every checkpoint holds the
config too, so evaluate and predict need nothing else. train, study and the benchmarks name these
files only through :class:`RunDir`.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from affectfast.errors import DataError

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    def write_config(self, config: dict) -> None:
        """Write config.json (the run's resolved settings)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(config, indent=2) + "\n")


# --- checkpoints and RNG state ---------------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG the run touches, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # This process's device only: a rank that resumes sees one GPU (CUDA_VISIBLE_DEVICES) or
        # another count than the saver did; all devices' states would not load there.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """An affectfast checkpoint (on the CPU); DataError if missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(path, f"cannot read checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, "not an affectfast checkpoint")
    return checkpoint


# --- metrics.jsonl --------------------------------------------------------------------------------


def append_metrics(path: Path, record: dict) -> None:
    """Add one epoch's record as a line of ``metrics.jsonl``."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (empty if absent); a line cut short is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # cut short by a kill: that epoch is redone on resume
            continue
    return records


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metrics.jsonl lines after the checkpoint being resumed (an epoch logged but not saved)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if _epoch_of(ln) <= epochs_done]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, path)


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a line cut short by a kill (dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
