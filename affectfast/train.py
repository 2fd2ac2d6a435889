"""Train uni- and multi-task ResNet-18 on packed shards (docs/design.md §4), validating every epoch.

``train(TrainConfig)`` fills a run folder (``rundir.py``: config.json, metrics.jsonl, tb/, last.pt,
best.pt), holding its lock for the run's lifetime; ``build_run`` builds what a run needs once (also
used by benchmarks/bench_train.py); ``predict_split``/``score`` are the validation pass that
``predict.py`` reuses for evaluate/predict; ``run_summary`` says where a run's files are.

Set once, never branched on in the step: the device, channels_last on the model, the autocast
context and ``GradScaler(enabled=...)``. Launched by ``torchrun`` it runs DDP (see ``dist.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from affectfast.config import TemporalConfig, TrainConfig
from affectfast.console import say
from affectfast.dist import (
    DistInfo,
    all_reduce_mean,
    broadcast_buffers,
    cpu_budget,
    gather_to_main,
    launched_rank,
    local_rank,
    main_decides,
    omp_num_threads,
    setup_distributed,
    teardown_distributed,
)
from affectfast.errors import DataError, check_writable_folder
from affectfast.loaders import Loader, build_loader, screen_labels
from affectfast.losses import TaskLoss, au_pos_weight, expr_class_weights, multitask_loss
from affectfast.metrics import Predictions, compute_metrics, headline, tune_au_thresholds
from affectfast.model import AffectNet, build_model
from affectfast.rundir import (
    CHECKPOINT_FORMAT,
    RESUME_ENTRIES,
    RunDir,
    append_metrics,
    load_checkpoint,
    read_config,
    read_metrics,
    restoring_from,
    rng_state,
    save_atomic,
    set_rng_state,
    truncate_metrics,
)
from affectfast.safe_files import excerpt, exclusive_lock
from affectfast.shards import MANIFEST, load_manifest
from affectfast.stage import stage
from affectfast.verify import first_bad_label

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WARMUP_FRACTION = 0.05  # of all steps: linear LR warm-up, then cosine decay to zero
# Config fields that may change between a run and its --resume without changing its results.
RESUMABLE_CHANGES = ("num_threads", "stage_dir", "dont_use_mmap", "read_ahead")
# The metrics.jsonl fields about the training pass (TensorBoard: train/...); the rest are val/....
TRAIN_FIELDS = ("train_loss", "train_batches", "images_per_s", "epoch_seconds", "lr")


def resolve_device(config: TrainConfig, cuda: bool | None = None):
    """Resolve the GPU defaults for this machine: (config with loader/amp made concrete, use_cuda).

    Without CUDA: ``dali-gpu`` becomes ``dali-cpu`` and ``amp=auto`` becomes off, announced in one
    line on stderr. An explicit ``bf16``/``fp16`` is kept (bf16 autocast works on the CPU). On
    CUDA ``amp=auto`` is bf16 where the GPU computes in bf16 natively (compute capability 8.0
    on), else fp16: V100 and T4 only emulate bf16, far slower than their fp16 tensor cores.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if config.device == "cuda" and not cuda:
        raise DataError(config.out, "--device cuda, but no CUDA device is visible here")
    cuda = cuda and config.device != "cpu"
    if cuda:
        amp = (
            config.amp
            if config.amp != "auto"
            else ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
        )
        return dataclasses.replace(config, amp=amp), True
    loader = "dali-cpu" if config.loader == "dali-gpu" else config.loader
    amp = "off" if config.amp == "auto" else config.amp
    if (loader, amp) != (config.loader, config.amp) and launched_rank() == 0:
        say(f"affectfast: no CUDA device, falling back to the CPU (loader {loader}, amp {amp})")
    return dataclasses.replace(config, loader=loader, amp=amp), False


# --- the machine: where the pack is read from, how many threads ---------------------------------


def stage_shards(config: TrainConfig) -> Path:
    """The pack this process reads: ``config.shards``, or its copy in ``config.stage_dir``.

    Called before the process group forms. Every process of a node calls ``stage``; its lock lets
    one copy (usually LOCAL_RANK 0, which shows the progress) while the others wait, then find the
    copy in place. ``config.shards`` stays the user's path (config.json, checkpoints, --resume).
    """
    if config.stage_dir is None:
        return config.shards
    result = stage(config.shards, config.stage_dir, progress=local_rank() == 0)
    if local_rank() == 0:
        say(f"affectfast: training from the staged copy {result.summary()}")
    return result.path


def loader_threads(config: TrainConfig, info: DistInfo) -> int:
    """``config.num_threads``, with "auto" resolved from this process's CPU budget (``cpu_budget``).

    On a GPU all of it: DALI's CPU threads read and (partly) decode what the GPU trains on. On the
    CPU a quarter of it, at least 1: the model step is the work there, and the loader decodes far
    faster than the CPU step consumes (README: 6,000 vs under 300 images/s on 2 cores).
    """
    if config.num_threads != "auto":
        return config.num_threads
    budget = cpu_budget()
    return budget if info.device.type == "cuda" else max(1, budget // 4)


def set_torch_threads(info: DistInfo) -> None:
    """On the CPU, cap torch's intra-op threads at the CPU budget less a quarter for the loader.

    A quarter rounded down: with 2 or 3 CPUs nothing is kept, the loader's thread (a few per cent
    of a core at CPU training speeds) shares them; with 16, torch gets at most 12. Never more
    threads than the budget: OpenMP threads wait for the slowest one at the end of every operation,
    and one that shares its core with another thread or process is slow. Only ever lowered, so a
    smaller count a caller set (``torch.set_num_threads``) stays, and so does OMP_NUM_THREADS
    (torch took its count from it when it loaded). GPU runs are left alone.
    """
    if info.device.type == "cpu" and omp_num_threads() is None:
        budget = cpu_budget()
        torch.set_num_threads(min(torch.get_num_threads(), budget - budget // 4))


# --- pieces built once per run ---------------------------------------------------------------------


def build_task_loss(config: TrainConfig, manifest: dict, manifest_path: Path) -> TaskLoss:
    """Loss settings: EXPR class weights and AU pos_weight from the train split's counts in the
    manifest (``manifest`` as ``load_manifest`` returns it: its stats already checked)."""
    try:
        stats = manifest["splits"]["train"]["stats"]
        unlabelled = [t for t in config.tasks if stats[t]["valid"] == 0]
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
            manifest_path, f"manifest lacks the train split's task counts ({excerpt(error)})"
        ) from None
    if unlabelled:
        raise unlabelled_tasks_error(config.tasks, unlabelled, manifest_path)
    return TaskLoss(config.va_loss, expr_weights, pos_weight, config.task_weights)


def unlabelled_tasks_error(tasks, unlabelled: list[str], manifest_path: Path) -> DataError:
    """The refusal of trained tasks that have no train label at all: each would be a head trained
    on nothing (its loss always 0), whose predictions look like any other's."""
    kept = [t for t in tasks if t not in unlabelled]
    advice = f"train with --tasks {','.join(kept)}" if kept else "nothing to train"
    return DataError(
        manifest_path,
        f"the train split has no {' and no '.join(unlabelled)} labels (splits.train.stats): "
        f"{advice}, or pack a tree with those annotation folders",
    )


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


def loader_options(config: TrainConfig, info: DistInfo) -> dict:
    """build_loader's settings that a run's train and val loaders share: size, rank, device,
    precision, seed, threads, and the decoder's and reader's options."""
    return dict(
        image_size=config.image_size,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        dtype=AMP_DTYPES.get(config.amp, torch.float32),
        seed=config.seed,
        num_threads=loader_threads(config, info),
        tree=config.tree,
        hw_decoder_load=config.hw_decoder_load,
        decoder_affine=config.decoder_affine,
        fancy_upsampling=config.fancy_upsampling,
        dont_use_mmap=config.dont_use_mmap,
        read_ahead=config.read_ahead,
    )


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
        augment=None,
        shuffle=False,
        with_keys=True,
        drop_last=False,
        **loader_options(config, info),
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


def progress(loader, desc: str, info: DistInfo) -> tqdm:
    """A progress bar over ``loader``'s batches on stderr (count, elapsed time, ETA, rate), shown
    by the main rank only and cleared when done."""
    return tqdm(
        loader,
        total=len(loader),
        desc=desc,
        unit="batch",
        disable=not info.is_main,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


def train_one_epoch(model, loader, step, info: DistInfo, desc: str) -> dict:
    """Run ``step`` over one epoch of ``loader``; return mean train loss, batches (this rank's),
    images/s (all ranks) and seconds."""
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    faults = torch.zeros((), dtype=torch.bool, device=info.device)  # a label out of range
    images = batches = 0
    start = time.perf_counter()
    bar = progress(loader, desc, info)
    for i, batch in enumerate(bar):
        faults |= screen_labels(batch.labels, batch.masks)  # before the step: it sees sane labels
        total += step(model, batch)
        images += len(batch)
        batches += 1
        if i % 10 == 0:
            bar.set_postfix_str(
                f"{images * info.world_size / (time.perf_counter() - start):.0f} img/s"
            )
    steps = max(1, len(loader))
    train_loss = all_reduce_mean(float(total.item()) / steps, info)  # .item() syncs the device
    seconds = time.perf_counter() - start
    return {
        "train_loss": train_loss,
        "train_batches": batches,
        "images_per_s": images * info.world_size / seconds,
        "epoch_seconds": seconds,
        "bad_labels": all_reduce_mean(float(faults.item()), info) > 0,  # on any rank
    }


@torch.no_grad()
def predict_split(
    model: AffectNet, loader, autocast, info: DistInfo, desc: str | None = None
) -> Predictions | None:
    """Every frame's outputs (VA values, EXPR logits, AU probabilities) with its labels and masks,
    gathered from every rank onto the main rank: the Predictions there, None on the others.

    Outputs, labels and masks stay on the device until the pass ends, then each is copied to the
    host once: no per-batch sync. A label out of range on any rank stops every rank with the same
    one-line DataError naming it. ``desc`` labels the progress bar (default: the split's name).
    """
    model.eval()
    keys: list[str] = []
    parts: tuple[list, list, list] = ([], [], [])  # per batch: outputs, labels, masks by task
    faults = torch.zeros((), dtype=torch.bool, device=info.device)
    for batch in progress(loader, desc or loader.config.split, info):
        faults |= screen_labels(batch.labels, batch.masks)  # in place: they leave the metrics
        with autocast():
            outputs = model(batch.images)
        outputs = {t: o.float().sigmoid() if t == "au" else o.float() for t, o in outputs.items()}
        for part, values in zip(parts, (outputs, batch.labels, batch.masks)):
            part.append(values)
        keys += batch.keys
    mine = Predictions(keys, *map(_to_host, parts)) if keys else Predictions()
    gathered = gather_to_main((mine, bool(faults)), info)

    def refuse_bad_labels() -> None:  # on the main rank, which alone has every rank's verdict
        if any(bad for _, bad in gathered):
            raise bad_label_error(loader.config.shards, loader.config.split, loader.config.tasks)

    main_decides(refuse_bad_labels, info)
    return Predictions.concat([p for p, _ in gathered]) if info.is_main else None


def _to_host(batches: list[dict]) -> dict:
    """Per task, the batches' tensors joined on their device and copied to the host in one go, as
    numpy (labels as float32, masks as bool)."""
    return {
        t: torch.cat([b[t] for b in batches])
        .to("cpu", torch.bool if batches[0][t].dtype == torch.bool else torch.float32)
        .numpy()
        for t in batches[0]
    }


def bad_label_error(shards: Path, split: str, tasks: tuple[str, ...]) -> DataError:
    """The DataError for a batch that held a label out of range: re-scan the split's tars for the
    first bad label component and name its shard and key."""
    found = first_bad_label(shards, split, tasks)
    if found is None:
        return DataError(
            shards,
            f"a {split} batch held a label out of range, yet every {split} label component in "
            "the tars is in range: an index (.idx) does not match its tar; run affectfast verify",
        )
    tar, member, what = found
    return DataError(
        tar,
        f"{member}: {what} is out of range (VA in [-1, 1], EXPR 0..7, AU 0/1); "
        "repack from the source or remove the sample; run affectfast verify",
    )


def validate(run: Run, config: TrainConfig, info: DistInfo, desc: str) -> dict:
    """The val metrics of ``run.model`` (``predict_split`` + ``score`` on the main rank), the same
    dict on every rank."""
    preds = predict_split(run.model, run.val_loader, run.autocast, info, desc)
    return main_decides(lambda: score(preds, config.tasks, config.tune_au_thresholds), info)


def score(preds: Predictions, tasks, tune: bool) -> dict:
    """compute_metrics, with per-AU thresholds tuned on ``preds`` itself when ``tune``."""
    thresholds = None
    if tune and "au" in tasks and preds.masks["au"].any():
        valid = preds.masks["au"].astype(bool)
        thresholds = tune_au_thresholds(preds.outputs["au"][valid], preds.labels["au"][valid])
    return compute_metrics(preds, tasks, thresholds)


# --- the public entry points ---------------------------------------------------------------------


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train as ``config`` says; return the metrics.jsonl records written by this call.

    ``resume``: continue from ``out/last.pt`` (model, optimizer, schedule, scaler, epoch, RNG).
    ``stop_after``: run at most this many epochs in this call, then return with ``last.pt`` ready
    for ``resume`` (for schedulers with wall-time limits).
    """
    config, use_cuda = resolve_device(config)
    shards = stage_shards(config)  # before the process group forms: a copy may take minutes
    info = setup_distributed(use_cuda)
    if use_cuda:
        set_cuda_numerics(config.deterministic)
    threads = torch.get_num_threads()
    try:
        set_torch_threads(info)
        return _train(config, info, resume, stop_after, shards)
    finally:
        torch.set_num_threads(threads)
        teardown_distributed()


@dataclass
class Run:
    """What one training run builds once: model, loaders, optimizer, schedule, precision, step."""

    model: AffectNet  # the bare model (what checkpoints and evaluation use)
    ddp: torch.nn.Module  # the model as trained: DistributedDataParallel when distributed
    train_loader: Loader
    val_loader: Loader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable  # zero-argument factory of the autocast context
    step: Callable  # step(model, batch) -> detached loss

    def state(self) -> dict:
        """The objects a checkpoint saves and ``--resume`` restores, by name."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
        }


def set_cuda_numerics(deterministic: bool) -> None:
    """cuDNN autotuning for speed (shapes are fixed), or bit-reproducible kernels without TF32."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic


def build_run(config: TrainConfig, info: DistInfo, shards: Path | None = None) -> Run:
    """Build everything a run needs on this rank (config already resolved for the machine).

    ``shards``: where to read the pack (its staged copy); ``config.shards`` when None.
    """
    shards = config.shards if shards is None else shards
    manifest = load_manifest(shards)
    loss_spec = build_task_loss(config, manifest, shards / MANIFEST).to(info.device)
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP broadcasts too)
    model = build_model(config.tasks, config.init)
    model = model.to(
        info.device,
        memory_format=torch.channels_last if config.channels_last else torch.preserve_format,
    )
    cuda = info.device.type == "cuda"
    # BatchNorm buffers: broadcast once per epoch (dist.broadcast_buffers), not every forward.
    ddp = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if cuda else None, broadcast_buffers=False
        )
        if info.distributed
        else model
    )
    if config.torch_compile:
        ddp = torch.compile(ddp)  # default mode: no CUDA graphs (the loader's buffers change)
    train_loader = build_loader(
        config.loader,
        shards,
        "train",
        config.tasks,
        config.batch_size,
        augment=config.augment_spec,
        shuffle=True,
        drop_last=True,
        **loader_options(config, info),
    )
    val_loader = build_eval_loader(config, shards, "val", info, config.batch_size)
    if len(train_loader) == 0:
        raise DataError(
            shards,
            f"the train split has fewer frames per rank than one batch ({config.batch_size})",
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=cuda or None
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
    return Run(model, ddp, train_loader, val_loader, optimizer, scheduler, scaler, autocast, step)


def _train(
    config: TrainConfig, info: DistInfo, resume: bool, stop_after: int | None, shards: Path
) -> list[dict]:
    folder = RunDir(config.out)
    with contextlib.ExitStack() as held:  # the main rank's hold on the run folder
        # Only the main rank reads and writes the run folder (--out may be on its node alone).
        restore = main_decides(lambda: claim_run_folder(folder, config, resume, held), info)
        run = build_run(config, info, shards)
        start_epoch, best = 0, -math.inf
        if restore:
            start_epoch, best = _restore(folder.last, config, run, info)
        writer = None
        if info.is_main:
            if resume:  # else a run killed before its first checkpoint: start it over
                truncate_metrics(folder.metrics, start_epoch)
            folder.write_config(config.to_dict())
            # A slow import: only the main rank logs.
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(folder.tensorboard))
        try:
            return _run_epochs(config, info, run, folder, writer, start_epoch, best, stop_after)
        finally:  # a run stopped by an error still closes its TensorBoard file and thread
            if writer is not None:
                writer.close()


def claim_run_folder(
    folder: RunDir, config: TrainConfig, resume: bool, held: contextlib.ExitStack
) -> bool:
    """On the main rank, before anything is built: take the run folder's lock for as long as
    ``held`` lasts (a second run into it is refused at once, naming the process that holds it),
    then :func:`check_run_folder`. Returns whether to restore ``last.pt``.

    The folders this creates are removed again if the run leaves them empty (a refused run).
    """
    check_writable_folder(folder.root)
    if resume and not folder.root.is_dir():
        raise DataError(folder.last, "checkpoint not found: no run to resume here")
    missing = [p for p in (folder.root, *folder.root.parents) if not p.exists()]
    folder.root.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):  # an ExitStack unwinds last first: the deepest goes first
        held.callback(_remove_if_empty, created)

    def refuse(holder: str) -> None:
        holder = " ".join(holder.split())  # the lock file's first 64 bytes, on one line
        raise DataError(
            folder.root,
            f"locked by process {holder}: another affectfast train is writing this run folder; "
            "wait for it to end or choose another --out",
        )

    held.enter_context(exclusive_lock(folder.lock, on_busy=refuse, remove=True))
    return check_run_folder(folder, config, resume)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _run_epochs(
    config,
    info,
    run: Run,
    folder: RunDir,
    writer,
    start_epoch: int,
    best: float,
    stop_after: int | None,
) -> list[dict]:
    """Train, validate, log and checkpoint epoch after epoch; return this call's records."""
    records = []
    end = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end):
        run.train_loader.set_epoch(epoch)
        desc = f"epoch {epoch + 1}/{config.epochs}"
        stats = train_one_epoch(run.ddp, run.train_loader, run.step, info, desc)
        _refuse_bad_epoch(config, epoch, stats.pop("bad_labels"), stats["train_loss"])
        broadcast_buffers(run.model, info)
        metrics = validate(run, config, info, f"val {epoch + 1}/{config.epochs}")
        record = {
            "epoch": epoch + 1,
            **stats,
            "lr": run.scheduler.get_last_lr()[0],
            **headline(metrics),
        }
        records.append(record)
        best = max(best, _p_mtl(metrics))
        loader_states = gather_to_main(run.train_loader.state_dict(), info)
        if info.is_main:
            log_epoch(folder, writer, record)
            state = {**run.state(), "loader": loader_states}
            _save_checkpoints(folder, config, epoch + 1, state, metrics, best)
    return records


def _p_mtl(metrics: dict) -> float:
    """P_MTL for choosing best.pt; -inf when no trained task had a val label (P_MTL absent)."""
    return -math.inf if metrics["p_mtl"] is None else metrics["p_mtl"]


def _refuse_bad_epoch(config: TrainConfig, epoch: int, bad_labels: bool, loss: float) -> None:
    """Stop before anything of this epoch is saved (last.pt, best.pt and metrics.jsonl keep the
    last good epoch) when it met a label out of range or its loss is not finite."""
    kept = f"last.pt and best.pt still hold epoch {epoch}" if epoch else "no checkpoint was written"
    if bad_labels:
        error = bad_label_error(config.shards, "train", config.tasks)
        raise DataError(error.path, f"{error.message}; {kept}", error.line)
    if not math.isfinite(loss):
        raise DataError(
            config.out,
            f"epoch {epoch + 1}: the train loss is {loss}: training diverged (try a lower --lr); "
            f"{kept}",
        )


def _save_checkpoints(
    folder: RunDir, config: TrainConfig, epochs_done: int, state: dict, metrics: dict, best: float
) -> None:
    """Write last.pt (always) and best.pt (when this epoch has the best val P_MTL), each atomically."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "epoch": epochs_done,
        **{name: obj if name == "loader" else obj.state_dict() for name, obj in state.items()},
        "world_size": len(state["loader"]),
        "rng": rng_state(),
        "best_p_mtl": best,
        "metrics": headline(metrics),
        "au_thresholds": metrics.get("au_thresholds"),
    }
    save_atomic(checkpoint, folder.last)
    if _p_mtl(metrics) >= best > -math.inf:
        save_atomic(checkpoint, folder.best)


def config_changes(saved: dict, config: TrainConfig) -> list[str]:
    """What differs between a run's saved config (config.json, a checkpoint's) and ``config``,
    as "FIELD changed (OLD -> NEW)", fields that may change (RESUMABLE_CHANGES) aside.

    Paths compare resolved (shards given relative or absolute are the same shards), and ``out``
    not at all: a run is where its files are, wherever the folder was moved.
    """

    def normal(values: dict) -> dict:
        values = {k: v for k, v in values.items() if k != "out" and k not in RESUMABLE_CHANGES}
        for key in ("shards", "tree", "features"):  # features: a TemporalConfig's
            if isinstance(values.get(key), str):
                values[key] = str(Path(values[key]).resolve())
        init = values.get("init")
        kind, _, path = init.partition(":") if isinstance(init, str) else ("", "", "")
        if path and kind in ("imagenet", "ckpt"):
            values["init"] = f"{kind}:{Path(path).resolve()}"
        return values

    old, new = normal(saved), normal(config.to_dict())
    return [
        f"{k} changed ({excerpt(old.get(k), 80)} -> {excerpt(v, 80)})"
        for k, v in new.items()
        if old.get(k) != v
    ]


def check_run_folder(folder: RunDir, config: TrainConfig, resume: bool) -> bool:
    """Before anything is built: a fresh run needs a folder without a run's files (it would
    append to another run's metrics.jsonl); --resume needs the same config, and last.pt or a run
    killed before its first checkpoint (config.json, at most one epoch logged). Returns whether
    there is a last.pt to restore."""
    present = [p for p in (folder.last, folder.config, folder.metrics) if p.exists()]
    if not resume:
        if present:
            raise DataError(
                present[0],
                "already holds a run; pass --resume to continue it or choose another --out",
            )
        return False
    if folder.config.exists():
        saved = read_config(folder.config)
        changed = config_changes(saved, config) if isinstance(saved, dict) else ["not a config"]
        if changed:
            raise DataError(
                folder.config, f"cannot resume with a different config: {', '.join(changed)}"
            )
    if folder.last.exists():
        return True
    if not folder.config.exists():
        raise DataError(folder.last, "checkpoint not found: no run to resume here")
    epochs = [r.get("epoch", 0) for r in read_metrics(folder.metrics) if isinstance(r, dict)]
    if max(epochs, default=0) > 1:
        raise DataError(
            folder.metrics,
            f"logs {max(epochs)} epochs but last.pt is missing; restore it or choose another --out",
        )
    return False


def _restore(path: Path, config: TrainConfig, run: Run, info: DistInfo) -> tuple[int, float]:
    """Load last.pt into the run's objects; return (epochs done, best P_MTL so far).

    Only rank 0 reads the file (``--out`` may be on rank 0's node alone) and sends it to the others
    (or the reason it cannot be read). Each rank continues its own loader state, so the number of
    processes cannot change.
    """
    checkpoint = main_decides(lambda: load_checkpoint(path, RESUME_ENTRIES), info)
    changed = config_changes(checkpoint["config"], config)
    if changed:
        raise DataError(path, f"cannot resume with a different config: {', '.join(changed)}")
    if checkpoint.get("world_size") != info.world_size or "loader" not in checkpoint:
        raise DataError(
            path,
            f"written by {checkpoint.get('world_size', 'an unknown number of')} processes, resumed "
            f"with {info.world_size}: each rank continues its own part of the epoch order, so "
            "resume with the same number of processes (or start a new run)",
        )
    with restoring_from(path):
        for name, obj in run.state().items():
            obj.load_state_dict(checkpoint[name])
        run.train_loader.load_state_dict(checkpoint["loader"][info.rank])
        set_rng_state(checkpoint["rng"])
        return int(checkpoint["epoch"]), float(checkpoint["best_p_mtl"])


def log_epoch(folder: RunDir, writer, record: dict, unit: str = "img/s") -> None:
    """Append the epoch to metrics.jsonl and TensorBoard, and one summary line to stderr
    (``unit`` names what ``images_per_s`` counts: train-temporal's heads step through frames)."""
    append_metrics(folder.metrics, record)
    for key, value in record.items():
        if key != "epoch" and value is not None:  # an absent task has no point to plot
            writer.add_scalar(scalar_tag(key), value, record["epoch"])
    writer.flush()
    shown = " ".join(
        f"{k}={record[k]:.4f}"
        for k in ("train_loss", "ccc_mean", "f1_expr", "f1_au", "p_mtl")
        if record.get(k) is not None
    )
    say(f"epoch {record['epoch']}: {shown} ({record['images_per_s']:.0f} {unit})")


def scalar_tag(field: str) -> str:
    """A metrics.jsonl field's TensorBoard tag: ``train/loss``, ``train/lr``, ``val/p_mtl``, ..."""
    if field in TRAIN_FIELDS:
        return f"train/{field.removeprefix('train_')}"
    return f"val/{field}"


def run_summary(config: TrainConfig | TemporalConfig) -> str:
    """Where a run's files are, on one screen: the run folder, best.pt (its epoch and val P_MTL),
    last.pt, metrics.jsonl, config.json and tb/, as the run folder holds them now (a train or a
    train-temporal run: both keep the same files)."""
    folder = RunDir(config.out)
    records = [r for r in read_metrics(folder.metrics) if isinstance(r, dict)]
    done = max((r.get("epoch", 0) for r in records), default=0)
    scored = [r for r in records if isinstance(r.get("p_mtl"), (int, float))]
    # best.pt is rewritten whenever an epoch equals the best P_MTL so far: the last such epoch.
    best = max(scored, key=lambda r: (r["p_mtl"], r["epoch"])) if scored else None
    left = "" if done >= config.epochs else "; --resume continues it"
    lines = [f"run folder {folder.root} ({done} of {config.epochs} epochs done{left})"]
    if best is not None and folder.best.exists():
        lines.append(
            f"  best.pt        epoch {best['epoch']}, the best val P_MTL {best['p_mtl']:.4f}"
        )
    elif best is None:
        lines.append("  best.pt        not written: no trained task has a val label (no P_MTL)")
    else:
        lines.append(f"  best.pt        missing (epoch {best['epoch']} had the best val P_MTL)")
    if folder.last.exists():
        lines.append(f"  last.pt        epoch {done}, what --resume continues from")
    lines += [
        f"  metrics.jsonl  one JSON line per epoch ({len(records)} lines)",
        "  config.json    the run's settings, resolved for this machine",
        f"  tb/            TensorBoard (train/ and val/ scalars): tensorboard --logdir "
        f"{folder.tensorboard}",
    ]
    return "\n".join(lines)
