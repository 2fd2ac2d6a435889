"""Train a sequence head over a feature folder (docs/temporal.md), validating every epoch.

``train_temporal(TemporalConfig)`` fills a run folder exactly as ``train`` does (``rundir.py``:
config.json, metrics.jsonl with the same keys, tb/, last.pt, best.pt, the lock, ``--resume``),
with the same masked losses and task weights (``losses``) and the same metrics (``train.score``).
Its checkpoints say ``"stage": "temporal"`` and carry the model's settings, the train split's
feature standardization and the fingerprints of the frame checkpoint and pack the features came
from. :func:`load_temporal_checkpoint` reads one back for evaluate and predict.

An epoch is every window of the train split (``sequence.build_windows``) in an order drawn from
the seed and the epoch, so ``--resume`` needs only the model, optimizer, schedule and RNG state.
Features are memory-mapped: a batch reads its windows' rows only, and never a JPEG.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from affectfast.config import TemporalConfig
from affectfast.errors import DataError
from affectfast.features import (
    FEATURES_MANIFEST,
    LABEL_SHAPES,
    FeatureSplit,
    check_source,
    load_manifest,
    load_split,
)
from affectfast.losses import TaskLoss, au_pos_weight, expr_class_weights, multitask_loss
from affectfast.metrics import Predictions, headline
from affectfast.model import HEAD_SIZE, load_weights_file
from affectfast.rundir import (
    CHECKPOINT_FORMAT,
    TEMPORAL_STAGE,
    RunDir,
    is_temporal,
    restoring_from,
    rng_state,
    save_atomic,
    set_rng_state,
    truncate_metrics,
)
from affectfast.sequence import (
    SequenceNet,
    Timeline,
    build_sequence_model,
    build_timeline,
    build_windows,
    feature_stats,
    gather_windows,
    predict_rows,
)
from affectfast.tasks import NUM_EXPR, TASKS
from affectfast.train import (
    build_schedule,
    claim_run_folder,
    config_changes,
    log_epoch,
    score,
)

# What --resume restores from last.pt besides the config and the model.
RESUME_ENTRIES = ("config", "model", "optimizer", "scheduler", "rng", "epoch", "best_p_mtl")


def resolve_device(config: TemporalConfig) -> torch.device:
    """The device the run uses: CUDA for auto where present; --device cuda without it refused."""
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise DataError(config.out, "--device cuda, but no CUDA device is visible here")
    return torch.device("cuda" if cuda and config.device != "cpu" else "cpu")


# --- the data -------------------------------------------------------------------------------------


@dataclass
class SplitWindows:
    """One split with its timeline and windows, built once per run."""

    split: FeatureSplit
    timeline: Timeline
    windows: np.ndarray  # (W, 2), see sequence.build_windows


def load_windows(folder: Path, name: str, manifest: dict, config: TemporalConfig) -> SplitWindows:
    split = load_split(folder, name, manifest)
    timeline = build_timeline(split)
    return SplitWindows(split, timeline, build_windows(timeline, config.window, config.stride))


def build_task_loss(config: TemporalConfig, split: FeatureSplit, manifest_path: Path) -> TaskLoss:
    """The loss settings from the train split's own labels (a feature folder has no pack stats):
    EXPR class weights and AU pos_weight as ``train.build_task_loss`` takes them from the
    manifest's counts; a trained task without a train label is refused as ``train`` does."""
    valid = {t: int(np.count_nonzero(split.masks[t])) if t in split.masks else 0 for t in TASKS}
    unlabelled = [t for t in config.tasks if valid[t] == 0]
    if unlabelled:  # a head trained on nothing, as train refuses it
        kept = [t for t in config.tasks if t not in unlabelled]
        advice = f"train with --tasks {','.join(kept)}" if kept else "nothing to train"
        raise DataError(
            manifest_path,
            f"the train split has no {' and no '.join(unlabelled)} labels (splits.train."
            f"labelled): {advice}, or extract features from a pack with those labels",
        )
    expr_weights = pos_weight = None
    if "expr" in config.tasks:
        labels = np.asarray(split.labels["expr"])[np.asarray(split.masks["expr"])]
        expr_weights = expr_class_weights(np.bincount(labels, minlength=NUM_EXPR)[:NUM_EXPR])
    if "au" in config.tasks:
        mask = np.asarray(split.masks["au"])
        positives = np.asarray(split.labels["au"])[mask].sum(0)
        pos_weight = au_pos_weight(positives, valid["au"])
    return TaskLoss(config.va_loss, expr_weights, pos_weight, config.task_weights)


# --- the run --------------------------------------------------------------------------------------


@dataclass
class TemporalRun:
    """What one run builds once: data, model, optimizer, schedule, loss, device."""

    config: TemporalConfig
    manifest: dict
    train: SplitWindows
    val: SplitWindows | None
    model: SequenceNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_spec: TaskLoss
    device: torch.device
    standardization: dict  # {"mean": (D,), "std": (D,)} float32 tensors, the train split's

    def state(self) -> dict:
        """The objects a checkpoint saves and ``--resume`` restores, by name."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train.windows) / self.config.batch_size)


def build_temporal_run(config: TemporalConfig, device: torch.device) -> TemporalRun:
    """Read the feature folder and build everything a run needs (also used by the benchmark)."""
    manifest = load_manifest(config.features)
    manifest_path = Path(config.features) / FEATURES_MANIFEST
    train = load_windows(config.features, "train", manifest, config)
    if len(train.windows) == 0:
        raise DataError(manifest_path, "the train split has no frames: nothing to train on")
    loss_spec = build_task_loss(config, train.split, manifest_path).to(device)
    val = (
        load_windows(config.features, "val", manifest, config)
        if "val" in manifest["splits"]
        else None
    )
    mean, std = feature_stats(train.split.features)
    torch.manual_seed(config.seed)
    model = build_sequence_model(
        config.model, config.tasks, train.split.dim, config.hidden, config.dropout
    )
    model.set_standardization(mean, std)
    model = model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = math.ceil(len(train.windows) / config.batch_size)
    scheduler = build_schedule(optimizer, config.epochs * steps)
    standardization = {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}
    return TemporalRun(
        config,
        manifest,
        train,
        val,
        model,
        optimizer,
        scheduler,
        loss_spec,
        device,
        standardization,
    )


def epoch_order(config: TemporalConfig, epoch: int, count: int) -> np.ndarray:
    """The epoch's window order: drawn from (seed, epoch) alone, so a resumed run repeats it."""
    return np.random.default_rng([config.seed, epoch]).permutation(count)


def train_step(run: TemporalRun, batch) -> torch.Tensor:
    """One optimization step on a batch of windows; returns the detached loss."""
    outputs = run.model(batch.features, batch.missing, batch.padding)
    flat = lambda d: {t: v.flatten(0, 1) for t, v in d.items()}  # noqa: E731  (B, W, ...) -> (B*W, ...)
    loss, _ = multitask_loss(flat(outputs), flat(batch.labels), flat(batch.masks), run.loss_spec)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach()


def train_one_epoch(run: TemporalRun, epoch: int, desc: str = "", show: bool = True) -> dict:
    """One pass over every train window; the train fields of a metrics.jsonl record.

    ``images_per_s`` counts the frames with an image the model stepped through, as train counts
    images: a frame in two overlapping windows counts twice (with the default window 256 and
    stride 128, about twice the split's frames per epoch)."""
    config, data = run.config, run.train
    run.model.train()
    order = epoch_order(config, epoch, len(data.windows))
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    frames = batches = 0
    start = time.perf_counter()
    bar = tqdm(
        range(0, len(order), config.batch_size),
        desc=desc,
        unit="batch",
        disable=not show,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    for first in bar:
        chosen = data.windows[np.sort(order[first : first + config.batch_size])]
        batch = gather_windows(data.split, data.timeline, chosen, config.window, config.tasks)
        frames += int((batch.rows >= 0).sum())
        total += train_step(run, batch.to(run.device))
        batches += 1
    loss = float(total.item()) / max(batches, 1)
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss,
        "train_batches": batches,
        "images_per_s": frames / seconds,
        "epoch_seconds": seconds,
    }


def split_predictions(split: FeatureSplit, outputs: dict, tasks: tuple[str, ...]) -> Predictions:
    """``Predictions`` of a split's rows (keys, outputs of predict_rows, its labels and masks);
    a task the split has no labels for gets empty masks (its metrics are then absent)."""
    rows = len(split.frames)
    labels, masks = {}, {}
    for task in tasks:
        shape, _ = LABEL_SHAPES[task]
        if task in split.labels:
            labels[task] = np.asarray(split.labels[task], dtype=np.float32)
            masks[task] = np.asarray(split.masks[task], dtype=bool)
        else:
            labels[task] = np.zeros((rows, *shape), dtype=np.float32)
            masks[task] = np.zeros(rows, dtype=bool)
    return Predictions(split.keys(), outputs, labels, masks)


def validate(run: TemporalRun, desc: str = "val") -> dict:
    """The val metrics (``train.score``); without a val split every metric is absent (None)."""
    config = run.config
    if run.val is None:
        empty = Predictions(
            [],
            {t: np.zeros((0, HEAD_SIZE[t]), np.float32) for t in config.tasks},
            {t: np.zeros((0, *LABEL_SHAPES[t][0]), np.float32) for t in config.tasks},
            {t: np.zeros(0, bool) for t in config.tasks},
        )
        return score(empty, config.tasks, False)
    outputs = predict_rows(
        run.model,
        run.val.split,
        config.window,
        config.stride,
        run.device,
        config.batch_size,
        progress=lambda batches: tqdm(
            batches, desc=desc, unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True
        ),
    )
    preds = split_predictions(run.val.split, outputs, config.tasks)
    return score(preds, config.tasks, config.tune_au_thresholds)


# --- checkpoints ----------------------------------------------------------------------------------


def feature_source(config: TemporalConfig, manifest: dict) -> dict:
    """What a checkpoint records of its feature folder: its path and the fingerprints of the frame
    checkpoint and the pack the features came from."""
    return {
        "path": str(Path(config.features).resolve()),
        "checkpoint": manifest["checkpoint"],
        "pack": manifest["pack"],
        "feature_dim": manifest["feature_dim"],
    }


def save_checkpoints(
    run: TemporalRun, folder: RunDir, epochs_done: int, metrics: dict, best: float
) -> None:
    """Write last.pt (always) and best.pt (when this epoch has the best val P_MTL), atomically."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "stage": TEMPORAL_STAGE,
        "config": run.config.to_dict(),
        "epoch": epochs_done,
        **{name: obj.state_dict() for name, obj in run.state().items()},
        "standardization": run.standardization,
        "features": feature_source(run.config, run.manifest),
        "rng": rng_state(),
        "best_p_mtl": best,
        "metrics": headline(metrics),
        "au_thresholds": metrics.get("au_thresholds"),
    }
    save_atomic(checkpoint, folder.last)
    if _p_mtl(metrics) >= best > -math.inf:
        save_atomic(checkpoint, folder.best)


def _p_mtl(metrics: dict) -> float:
    return -math.inf if metrics["p_mtl"] is None else metrics["p_mtl"]


def read_temporal_checkpoint(path: Path, entries: tuple[str, ...] = ("config", "model")) -> dict:
    """A train-temporal checkpoint holding ``entries``; a frame checkpoint (no ``stage``
    temporal) or anything else is a one-line DataError."""
    path = Path(path)
    checkpoint = load_weights_file(path, "checkpoint")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, "not an affectfast checkpoint")
    if not is_temporal(checkpoint):
        raise DataError(
            path,
            "a frame checkpoint (affectfast train), not a temporal one (affectfast "
            "train-temporal): it cannot continue or run as a sequence head",
        )
    missing = [name for name in entries if name not in checkpoint]
    if missing:
        raise DataError(path, f"not a complete temporal checkpoint: no {', '.join(missing)}")
    try:
        TemporalConfig.from_dict(checkpoint["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(path, f"its config is not a temporal run's ({str(error)[:300]})") from None
    return checkpoint


def load_temporal_checkpoint(path: Path) -> tuple[SequenceNet, TemporalConfig, dict]:
    """(model on the CPU in eval mode, its TemporalConfig, the checkpoint) of a train-temporal
    checkpoint: what evaluate and predict need (the feature folder it was trained on is
    ``checkpoint["features"]``; feed ``predict_rows`` the config's window and stride)."""
    checkpoint = read_temporal_checkpoint(path)
    config = TemporalConfig.from_dict(checkpoint["config"])
    dim = int(checkpoint["features"]["feature_dim"])
    model = build_sequence_model(config.model, config.tasks, dim, config.hidden, config.dropout)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise DataError(path, f"its model weights do not fit its config ({first[:200]})") from None
    return model.eval(), config, checkpoint


# --- the run folder -------------------------------------------------------------------------------


def check_resume_stage(folder: RunDir, resume: bool) -> None:
    """--resume on a run folder whose last.pt is a frame run's is refused before anything else."""
    if resume and folder.last.is_file():
        read_temporal_checkpoint(folder.last, ())


def restore(path: Path, run: TemporalRun) -> tuple[int, float]:
    """Load last.pt into the run; return (epochs done, best P_MTL so far)."""
    checkpoint = read_temporal_checkpoint(path, RESUME_ENTRIES)
    changed = config_changes(checkpoint["config"], run.config)
    if changed:
        raise DataError(path, f"cannot resume with a different config: {', '.join(changed)}")
    source = checkpoint.get("features") or {}
    check_source(
        run.config.features,
        run.manifest,
        checkpoint_sha256=(source.get("checkpoint") or {}).get("sha256"),
        pack_sha256=(source.get("pack") or {}).get("sha256"),
    )
    with restoring_from(path):
        for name, obj in run.state().items():
            obj.load_state_dict(checkpoint[name])
        set_rng_state(checkpoint["rng"])
        return int(checkpoint["epoch"]), float(checkpoint["best_p_mtl"])


def train_temporal(
    config: TemporalConfig, resume: bool = False, stop_after: int | None = None
) -> list[dict]:
    """Train as ``config`` says; return the metrics.jsonl records written by this call.

    ``resume``: continue from ``out/last.pt`` (model, optimizer, schedule, epoch, RNG).
    ``stop_after``: run at most this many epochs now, leaving ``last.pt`` for ``resume``.
    """
    device = resolve_device(config)
    folder = RunDir(config.out)
    check_resume_stage(folder, resume)
    with contextlib.ExitStack() as held:
        restoring = claim_run_folder(folder, config, resume, held)
        run = build_temporal_run(config, device)
        start_epoch, best = 0, -math.inf
        if restoring:
            start_epoch, best = restore(folder.last, run)
        if resume:
            truncate_metrics(folder.metrics, start_epoch)
        folder.write_config(config.to_dict())
        from torch.utils.tensorboard import SummaryWriter  # a slow import

        writer = SummaryWriter(str(folder.tensorboard))
        try:
            return _run_epochs(run, folder, writer, start_epoch, best, stop_after)
        finally:
            writer.close()


def _run_epochs(
    run: TemporalRun, folder: RunDir, writer, start_epoch: int, best: float, stop_after
) -> list[dict]:
    config, records = run.config, []
    end = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end):
        stats = train_one_epoch(run, epoch, f"epoch {epoch + 1}/{config.epochs}")
        if not math.isfinite(stats["train_loss"]):
            kept = f"last.pt still holds epoch {epoch}" if epoch else "no checkpoint was written"
            raise DataError(
                config.out,
                f"epoch {epoch + 1}: the train loss is {stats['train_loss']}: training diverged "
                f"(try a lower --lr); {kept}",
            )
        metrics = validate(run, f"val {epoch + 1}/{config.epochs}")
        record = {
            "epoch": epoch + 1,
            **stats,
            "lr": run.scheduler.get_last_lr()[0],
            **headline(metrics),
        }
        records.append(record)
        best = max(best, _p_mtl(metrics))
        log_epoch(folder, writer, record, unit="frames/s")
        save_checkpoints(run, folder, epoch + 1, metrics, best)
    return records
