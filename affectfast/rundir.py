"""A run folder: its file names, checkpoints (with RNG state) and per-epoch metrics records.

``OUT/config.json`` (the resolved TrainConfig), ``OUT/metrics.jsonl`` (one JSON object per epoch),
TensorBoard events under ``OUT/tb/``, ``OUT/last.pt`` (written atomically every epoch, what
``--resume`` continues from) and ``OUT/best.pt`` (highest val P_MTL); ``OUT/.train.lock`` while a
run holds the folder. Every checkpoint holds the config too, so evaluate and predict need nothing
else. train, study and the benchmarks name these files only through :class:`RunDir`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from affectfast.config import TrainConfig
from affectfast.errors import DataError
from affectfast.model import AffectNet, load_weights_file
from affectfast.safe_files import read_text

CONFIG_LIMIT = 1 << 20  # bytes: a run's config.json is about 1 KB
METRICS_LIMIT = 1 << 26  # bytes: a metrics.jsonl line is under 1 KB, so a million epochs

CHECKPOINT_FORMAT = 1
TEMPORAL_STAGE = "temporal"  # a temporal head's checkpoint says "stage": "temporal"


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

    @property
    def lock(self) -> Path:
        """Held (``safe_files.exclusive_lock``) by the run writing here, removed when it ends."""
        return self.root / ".train.lock"

    def write_config(self, config: dict) -> None:
        """Write config.json (the run's resolved settings)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.config.write_text(json.dumps(config, indent=2) + "\n")
        except OSError as error:  # a write() error names no file
            error.filename = error.filename or str(self.config)
            raise


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


DISK_FULL = 1 << 24  # bytes: less free space than this after a failed torch.save means a full disk


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash never leaves half a
    file, and a failed save (a full disk) removes its temporary (a checkpoint is ~45 MB)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as error:  # torch's writer reports a full disk as "unexpected pos ..."
        full = shutil.disk_usage(tmp.parent).free < DISK_FULL
        tmp.unlink(missing_ok=True)
        reason = os.strerror(errno.ENOSPC) if full else f"write failed ({str(error)[:120]})"
        raise OSError(errno.ENOSPC if full else errno.EIO, reason, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# What evaluate and predict read from a checkpoint, and what --resume restores besides.
EVAL_ENTRIES = ("config", "model")
RESUME_ENTRIES = (*EVAL_ENTRIES, "optimizer", "scheduler", "scaler", "rng", "epoch", "best_p_mtl")


def load_checkpoint(
    path: Path, entries: tuple[str, ...] = EVAL_ENTRIES, *, temporal_ok: bool = False
) -> dict:
    """An affectfast checkpoint (on the CPU) holding ``entries``, its config a valid TrainConfig
    and its model the network that config describes; else a one-line DataError.

    A temporal checkpoint (``train-temporal``) is refused unless ``temporal_ok``: then it is
    returned unchecked, for its own stage to check (``train_temporal.check_temporal_checkpoint``).
    """
    path = Path(path)
    checkpoint = load_weights_file(path, "checkpoint")
    if is_temporal(checkpoint):
        if temporal_ok:
            return checkpoint
        raise DataError(
            path,
            "a temporal checkpoint (train-temporal): this needs a frame checkpoint "
            "(train's best.pt or last.pt)",
        )
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, "not an affectfast checkpoint")
    missing = [name for name in entries if name not in checkpoint]
    if missing:
        raise DataError(path, f"not a complete affectfast checkpoint: no {', '.join(missing)}")
    try:
        config = TrainConfig.from_dict(checkpoint["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(path, f"its config is not a run's ({str(error)[:300]})") from None
    if "model" in entries:
        _check_model_state(path, checkpoint["model"], config.tasks)
    return checkpoint


@contextlib.contextmanager
def restoring_from(path: Path):
    """Wrap the loading of a checkpoint's states into a run (``--resume``): a state that does not
    fit (missing, wrong shape, wrong type) becomes one DataError naming the checkpoint."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(path, f"cannot restore this run from it ({first[:200]})") from None


def is_temporal(checkpoint: dict) -> bool:
    """Whether a loaded checkpoint is a temporal head's (``train-temporal``), not a frame model's."""
    return checkpoint.get("stage") == TEMPORAL_STAGE


def _check_model_state(path: Path, state, tasks: tuple[str, ...]) -> None:
    """The saved weights must be those of the model its config describes (names and shapes)."""
    expected = {k: tuple(v.shape) for k, v in AffectNet(tasks).state_dict().items()}
    found = (
        {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if isinstance(state, dict)
        else {}
    )
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [
            k for k in expected if found[k] != expected[k]
        ]
        raise DataError(
            path,
            f"its model weights do not fit its config (tasks {','.join(tasks)}): {wrong[0]} and "
            f"{len(wrong) - 1} more differ",
        )


# --- metrics.jsonl --------------------------------------------------------------------------------


def append_metrics(path: Path, record: dict) -> None:
    """Add one epoch's record as a line of ``metrics.jsonl``."""
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as error:  # a write() error names no file
        error.filename = error.filename or str(path)
        raise


def read_config(path: Path):
    """The JSON value of a run's ``config.json`` (a regular file, at most CONFIG_LIMIT bytes);
    a DataError when it cannot be read or parsed."""
    try:
        return json.loads(read_text(path, limit=CONFIG_LIMIT, what="run config"))
    except (OSError, ValueError, RecursionError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(path, f"unreadable run config ({str(error)[:200]})") from None


def read_metrics(path: Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (empty if absent); a line cut short is skipped."""
    if not path.exists():
        return []
    records = []
    for line in read_text(path, limit=METRICS_LIMIT, what="metrics.jsonl").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # cut short by a kill: that epoch is redone on resume
            continue
    return records


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metrics.jsonl lines after the checkpoint being resumed (an epoch logged but not saved)."""
    if path.exists():
        text = read_text(path, limit=METRICS_LIMIT, what="metrics.jsonl")
        lines = [ln for ln in text.splitlines() if _epoch_of(ln) <= epochs_done]
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text("".join(ln + "\n" for ln in lines))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a line cut short by a kill (dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
