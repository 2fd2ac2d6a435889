"""Train, evaluate and predict: uni- and multi-task ResNet-18 on packed shards (DESIGN.md §4).

A run is a folder: ``config.json`` (the resolved :class:`TrainConfig`), ``metrics.jsonl`` (one JSON
object per epoch), TensorBoard events under ``tb/``, ``last.pt`` (written atomically every epoch,
what ``resume`` continues from) and ``best.pt`` (highest val P_MTL). Every checkpoint holds the
config too, so ``evaluate``/``predict`` need nothing else.

Set once, never branched on in the step: the device, channels_last on the model, the autocast
context and ``GradScaler(enabled=...)``. Launched by ``torchrun`` it runs DDP (see ``dist.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from affectfast.dist import (
    DistInfo,
    all_reduce_mean,
    broadcast_buffers,
    gather_objects,
    setup_distributed,
    teardown_distributed,
)
from affectfast.errors import DataError
from affectfast.loader import LOADER_KINDS, AugmentSpec, build_loader
from affectfast.losses import TaskLoss, au_pos_weight, expr_class_weights, multitask_loss
from affectfast.metrics import Predictions, compute_metrics, headline, tune_au_thresholds
from affectfast.model import AffectNet, build_model, parse_init
from affectfast.pack import MANIFEST, load_manifest
from affectfast.tasks import CHALLENGE_DIRS, HEADERS, TASKS, parse_tasks

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WARMUP_FRACTION = 0.05  # of all steps: linear LR warm-up, then cosine decay to zero
CHECKPOINT_FORMAT = 1
# Config fields that may change between a run and its --resume without changing its results.
RESUMABLE_CHANGES = ("num_threads",)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as config.json and inside every checkpoint.

    Defaults fit a GPU node (DALI on the GPU, mixed precision, channels_last); :func:`resolve_device`
    turns them into their CPU twins where CUDA is absent.
    """

    shards: Path  # a pack output folder (manifest.json + train/val shards)
    out: Path  # the run folder, e.g. runs/NAME
    tasks: tuple[str, ...] = TASKS
    loader: str = "dali-gpu"  # one of LOADER_KINDS
    epochs: int = 10
    batch_size: int = 256  # per rank
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 1e-4
    image_size: int = 112  # px, square
    amp: str = "auto"  # auto (bf16 where supported, else fp16; off on the CPU) | bf16 | fp16 | off
    channels_last: bool = True
    init: str = "scratch"  # scratch | imagenet | imagenet:PATH | ckpt:PATH
    va_loss: str = "ccc"  # ccc (1 - CCC) | mse
    task_weights: tuple[tuple[str, float], ...] = ()  # (task, weight) pairs; unlisted tasks weigh 1
    augment: bool = True  # random flip + rotation on train
    rotate_degrees: float = 10.0
    flip: bool = True
    interpolation: str = "nearest"  # nearest | linear
    seed: int = 0
    num_threads: int = 2  # DALI threads / DataLoader workers per rank
    tune_au_thresholds: bool = False  # also report AU F1 at per-AU thresholds tuned on val
    tree: Path | None = None  # the raw Aff-Wild2 root, for loader "files" only

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("shards", Path(self.shards))
        set_("out", Path(self.out))
        set_("tree", None if self.tree is None else Path(self.tree))
        set_("tasks", parse_tasks(self.tasks))
        set_("task_weights", tuple((str(t), float(w)) for t, w in dict(self.task_weights).items()))
        parse_init(self.init)
        checks = [
            (self.loader in LOADER_KINDS, f"loader must be one of {LOADER_KINDS}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (BatchNorm and CCC need two frames)"),
            (self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0"),
            (self.image_size >= 32, "image_size must be >= 32 px"),
            (self.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}"),
            (self.va_loss in ("ccc", "mse"), "va_loss must be ccc or mse"),
            (
                all(t in self.tasks and w >= 0 for t, w in self.task_weights),
                "task_weights must name trained tasks with weights >= 0",
            ),
            (
                self.interpolation in ("nearest", "linear"),
                "interpolation must be nearest or linear",
            ),
            (
                self.rotate_degrees >= 0 and self.num_threads >= 1,
                "rotate_degrees >= 0, num_threads >= 1",
            ),
            (self.loader != "files" or self.tree is not None, "loader files needs tree"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict (paths as strings, tuples as lists)."""
        d = dataclasses.asdict(self)
        d.update(
            shards=str(self.shards),
            out=str(self.out),
            tree=None if self.tree is None else str(self.tree),
            tasks=list(self.tasks),
            task_weights=[list(p) for p in self.task_weights],
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            **{
                **d,
                "tasks": tuple(d["tasks"]),
                "task_weights": tuple(map(tuple, d["task_weights"])),
            }
        )

    @property
    def augment_spec(self) -> AugmentSpec | None:
        return (
            AugmentSpec(self.flip, self.rotate_degrees, self.interpolation)
            if self.augment
            else None
        )


def resolve_device(config: TrainConfig, cuda: bool | None = None):
    """Resolve the GPU defaults for this machine: (config with loader/amp made concrete, use_cuda).

    Without CUDA: ``dali-gpu`` becomes ``dali-cpu`` and ``amp=auto`` becomes off, announced in one
    line on stderr. An explicit ``bf16``/``fp16`` is kept (bf16 autocast works on the CPU).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        amp = (
            config.amp
            if config.amp != "auto"
            else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        )
        return dataclasses.replace(config, amp=amp), True
    loader = "dali-cpu" if config.loader == "dali-gpu" else config.loader
    amp = "off" if config.amp == "auto" else config.amp
    if (loader, amp) != (config.loader, config.amp) and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"affectfast: no CUDA device, falling back to the CPU (loader {loader}, amp {amp})",
            file=sys.stderr,
        )
    return dataclasses.replace(config, loader=loader, amp=amp), False


# --- pieces built once per run ---------------------------------------------------------------------


def build_task_loss(config: TrainConfig, manifest: dict, manifest_path: Path) -> TaskLoss:
    """Loss settings: EXPR class weights and AU pos_weight from the train split's counts in the manifest."""
    try:
        stats = manifest["splits"]["train"]["stats"]
        expr_weights = (
            expr_class_weights(stats["expr"]["class_counts"]) if "expr" in config.tasks else None
        )
        pos_weight = (
            au_pos_weight(stats["au"]["positive_counts"], stats["au"]["valid"])
            if "au" in config.tasks
            else None
        )
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(
            manifest_path, f"manifest lacks the train split's task counts ({error!r})"
        ) from error
    return TaskLoss(config.va_loss, expr_weights, pos_weight, config.task_weights)


def build_autocast(device: torch.device, amp: str):
    """A zero-argument factory of the autocast context for this run (disabled when amp is off)."""
    return functools.partial(
        torch.autocast, device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off"
    )


def build_schedule(optimizer, total_steps: int):
    """Linear warm-up over WARMUP_FRACTION of the steps, then cosine decay to zero; stepped per batch."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_eval_loader(
    config: TrainConfig, shards: Path, split: str, info: DistInfo, batch_size: int
):
    """A keyed, unaugmented loader over every frame of ``split`` (each frame once across ranks)."""
    return build_loader(
        config.loader,
        shards,
        split,
        config.tasks,
        batch_size,
        image_size=config.image_size,
        augment=None,
        shuffle=False,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        dtype=AMP_DTYPES.get(config.amp, torch.float32),
        with_keys=True,
        drop_last=False,
        seed=config.seed,
        num_threads=config.num_threads,
        tree=config.tree,
    )


# --- the step, the epoch, the evaluation ----------------------------------------------------------


def train_step(
    model, batch, optimizer, scheduler, scaler, autocast, loss_spec: TaskLoss
) -> torch.Tensor:
    """One optimization step on one batch; returns the detached loss (no host sync)."""
    with autocast():
        outputs = model(batch.images)
    loss, _ = multitask_loss(outputs, batch.labels, batch.masks, loss_spec)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def train_one_epoch(model, loader, step, info: DistInfo, desc: str) -> dict:
    """Run ``step`` over one epoch of ``loader``; return mean train loss, images/s (all ranks), seconds."""
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    images = 0
    start = time.perf_counter()
    bar = tqdm(
        loader,
        total=len(loader),
        desc=desc,
        unit="batch",
        disable=not info.is_main,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    for i, batch in enumerate(bar):
        total += step(model, batch)
        images += len(batch)
        if i % 10 == 0:
            bar.set_postfix_str(
                f"{images * info.world_size / (time.perf_counter() - start):.0f} img/s"
            )
    steps = max(1, len(loader))
    train_loss = all_reduce_mean(float(total.item()) / steps, info)  # .item() syncs the device
    seconds = time.perf_counter() - start
    return {
        "train_loss": train_loss,
        "images_per_s": images * info.world_size / seconds,
        "epoch_seconds": seconds,
    }


@torch.no_grad()
def predict_split(model: AffectNet, loader, autocast, info: DistInfo) -> Predictions:
    """Every frame's outputs (VA values, EXPR logits, AU probabilities) with labels, gathered over ranks."""
    model.eval()
    parts = []
    for batch in loader:
        with autocast():
            outputs = model(batch.images)
        outputs = {
            t: (o.float().sigmoid() if t == "au" else o.float()).cpu().numpy()
            for t, o in outputs.items()
        }
        parts.append(
            Predictions(
                list(batch.keys),
                outputs,
                {t: v.float().cpu().numpy() for t, v in batch.labels.items()},
                {t: v.cpu().numpy() for t, v in batch.masks.items()},
            )
        )
    mine = Predictions.concat(parts)
    return Predictions.concat(gather_objects(mine, info))


def score(preds: Predictions, tasks, tune: bool) -> dict:
    """compute_metrics, with per-AU thresholds tuned on ``preds`` itself when ``tune``."""
    thresholds = None
    if tune and "au" in tasks:
        valid = preds.masks["au"].astype(bool)
        thresholds = tune_au_thresholds(preds.outputs["au"][valid], preds.labels["au"][valid])
    return compute_metrics(preds, tasks, thresholds)


# --- checkpoints ---------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG the run touches, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
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


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, epochs_done: int) -> None:
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


# --- the public entry points ---------------------------------------------------------------------


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train as ``config`` says; return the metrics.jsonl records written by this call.

    ``resume``: continue from ``out/last.pt`` (model, optimizer, schedule, scaler, epoch, RNG).
    ``stop_after``: run at most this many epochs in this call, then return with ``last.pt`` ready
    for ``resume`` (for schedulers with wall-time limits).
    """
    config, use_cuda = resolve_device(config)
    info = setup_distributed(use_cuda)
    try:
        return _train(config, info, resume, stop_after)
    finally:
        teardown_distributed()


def _train(config: TrainConfig, info: DistInfo, resume: bool, stop_after: int | None) -> list[dict]:
    out = config.out
    if not resume and (out / "last.pt").exists():
        raise DataError(
            out,
            "already holds a run (last.pt); pass --resume to continue it or choose another --out",
        )
    manifest = load_manifest(config.shards)
    loss_spec = build_task_loss(config, manifest, config.shards / MANIFEST).to(info.device)
    torch.manual_seed(
        config.seed
    )  # the same initial weights on every rank (DDP also broadcasts them)
    model = build_model(config.tasks, config.init)
    model = model.to(
        info.device,
        memory_format=torch.channels_last if config.channels_last else torch.preserve_format,
    )
    ddp = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None
        )
        if info.distributed
        else model
    )
    dtype = AMP_DTYPES.get(config.amp, torch.float32)
    train_loader = build_loader(
        config.loader,
        config.shards,
        "train",
        config.tasks,
        config.batch_size,
        image_size=config.image_size,
        augment=config.augment_spec,
        shuffle=True,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        dtype=dtype,
        drop_last=True,
        seed=config.seed,
        num_threads=config.num_threads,
        tree=config.tree,
    )
    val_loader = build_eval_loader(config, config.shards, "val", info, config.batch_size)
    if len(train_loader) == 0:
        raise DataError(
            config.shards,
            f"the train split has fewer frames per rank than one batch ({config.batch_size})",
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = build_schedule(optimizer, config.epochs * len(train_loader))
    scaler = torch.amp.GradScaler(info.device.type, enabled=config.amp == "fp16")
    autocast = build_autocast(info.device, config.amp)
    step = functools.partial(
        train_step,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        autocast=autocast,
        loss_spec=loss_spec,
    )

    start_epoch, best = 0, -math.inf
    if resume:
        start_epoch, best = _restore(out / "last.pt", config, model, optimizer, scheduler, scaler)
        if info.is_main:
            _truncate_metrics(out / "metrics.jsonl", start_epoch)
    writer = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        from torch.utils.tensorboard import SummaryWriter  # slow import; only the main rank logs

        writer = SummaryWriter(str(out / "tb"))

    records = []
    end = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end):
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(ddp, train_loader, step, info, f"epoch {epoch + 1}/{config.epochs}")
        broadcast_buffers(model, info)
        metrics = score(
            predict_split(model, val_loader, autocast, info),
            config.tasks,
            config.tune_au_thresholds,
        )
        record = {
            "epoch": epoch + 1,
            **stats,
            "lr": scheduler.get_last_lr()[0],
            **headline(metrics),
        }
        records.append(record)
        best = max(best, metrics["p_mtl"])
        if info.is_main:
            _log_epoch(out, writer, record, metrics)
            state = {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "scaler": scaler,
            }
            _save_checkpoints(out, config, epoch + 1, state, metrics, best)
    if writer is not None:
        writer.close()
    return records


def _save_checkpoints(
    out: Path, config: TrainConfig, epochs_done: int, state: dict, metrics: dict, best: float
) -> None:
    """Write last.pt (always) and best.pt (when this epoch has the best val P_MTL), each atomically."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "epoch": epochs_done,
        **{name: obj.state_dict() for name, obj in state.items()},
        "rng": rng_state(),
        "best_p_mtl": best,
        "metrics": headline(metrics),
        "au_thresholds": metrics.get("au_thresholds"),
    }
    save_atomic(checkpoint, out / "last.pt")
    if metrics["p_mtl"] >= best:
        save_atomic(checkpoint, out / "best.pt")


def _restore(
    path: Path, config: TrainConfig, model, optimizer, scheduler, scaler
) -> tuple[int, float]:
    """Load last.pt into the run's objects; return (epochs done, best P_MTL so far)."""
    checkpoint = load_checkpoint(path)
    saved = checkpoint["config"]
    changed = sorted(
        k for k, v in config.to_dict().items() if saved.get(k) != v and k not in RESUMABLE_CHANGES
    )
    if changed:
        raise DataError(
            path, f"cannot resume with a different config: {', '.join(changed)} changed"
        )
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["epoch"], checkpoint["best_p_mtl"]


def _log_epoch(out: Path, writer, record: dict, metrics: dict) -> None:
    """Append the epoch to metrics.jsonl and TensorBoard, and one summary line to stderr."""
    _append_metrics(out / "metrics.jsonl", record)
    for key, value in record.items():
        if key != "epoch":
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()
    shown = " ".join(
        f"{k}={record[k]:.4f}"
        for k in ("train_loss", "ccc_mean", "f1_expr", "f1_au", "p_mtl")
        if k in record
    )
    print(f"epoch {record['epoch']}: {shown} ({record['images_per_s']:.0f} img/s)", file=sys.stderr)


@dataclass(frozen=True)
class EvalConfig:
    """What evaluate and predict need beyond the checkpoint (which carries tasks, image size, precision)."""

    checkpoint: Path
    shards: Path
    split: str = "val"
    loader: str = "dali-gpu"
    batch_size: int = 256
    num_threads: int = 2
    tune_au_thresholds: bool = False

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "shards", Path(self.shards))
        if self.loader not in LOADER_KINDS or self.batch_size < 1 or self.num_threads < 1:
            raise ValueError(f"bad evaluation settings: {self!r}")


def _load_for_eval(config: EvalConfig):
    """(model, run config resolved for this machine, dist info, autocast, checkpoint)."""
    checkpoint = load_checkpoint(config.checkpoint)
    saved = TrainConfig.from_dict(checkpoint["config"])
    # The saved precision is concrete (bf16, fp16 or off): evaluate as trained; only the loader follows the machine.
    run = dataclasses.replace(
        saved, shards=config.shards, loader=config.loader, num_threads=config.num_threads
    )
    run, use_cuda = resolve_device(run)
    info = setup_distributed(use_cuda)
    model = AffectNet(run.tasks)
    model.load_state_dict(checkpoint["model"])
    model = model.to(
        info.device,
        memory_format=torch.channels_last if run.channels_last else torch.preserve_format,
    )
    return model, run, info, build_autocast(info.device, run.amp), checkpoint


def evaluate(config: EvalConfig) -> dict:
    """The checkpoint's metrics on ``config.split`` of ``config.shards`` (all ranks gathered)."""
    model, run, info, autocast, _ = _load_for_eval(config)
    try:
        loader = build_eval_loader(run, config.shards, config.split, info, config.batch_size)
        return score(
            predict_split(model, loader, autocast, info), run.tasks, config.tune_au_thresholds
        )
    finally:
        teardown_distributed()


def predict(config: EvalConfig, out: Path) -> list[Path]:
    """Write ABAW-layout prediction files: ``out/<Challenge>/<video>.txt`` per trained task and video.

    Each file has the task's annotation header and one line per frame present in the shards, in
    frame order: VA ``valence,arousal`` clipped to [-1, 1], EXPR the class index, AU twelve 0/1
    (at the checkpoint's tuned thresholds where it has them, else 0.5).
    """
    model, run, info, autocast, checkpoint = _load_for_eval(config)
    try:
        loader = build_eval_loader(run, config.shards, config.split, info, config.batch_size)
        preds = predict_split(model, loader, autocast, info)
    finally:
        teardown_distributed()
    if not info.is_main:
        return []
    thresholds = np.asarray(checkpoint.get("au_thresholds") or [0.5] * len(HEADERS["au"]))
    videos = np.asarray([k.rsplit("/", 1)[0] for k in preds.keys])
    written = []
    # Keys are sorted, so each video's frames are one contiguous, ordered range.
    names, starts = np.unique(videos, return_index=True)
    order = np.argsort(starts)  # key order, which can differ from name order ("v-2/" < "v/")
    names, starts = names[order], starts[order]
    ends = np.append(starts[1:], len(videos)).astype(int)
    for task in run.tasks:
        folder = Path(out) / CHALLENGE_DIRS[task][0]
        folder.mkdir(parents=True, exist_ok=True)
        for video, start, end in zip(names, starts, ends):
            rows = preds.outputs[task][start:end]
            written.append(_write_prediction(folder / f"{video}.txt", task, rows, thresholds))
    return written


def _write_prediction(path: Path, task: str, rows: np.ndarray, thresholds: np.ndarray) -> Path:
    if task == "va":
        lines = [f"{v:.6f},{a:.6f}" for v, a in np.clip(rows, -1, 1)]
    elif task == "expr":
        lines = [str(int(c)) for c in rows.argmax(1)]
    else:
        lines = [",".join(str(int(x)) for x in r) for r in rows > thresholds]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(",".join(HEADERS[task]) + "\n" + "".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return path
