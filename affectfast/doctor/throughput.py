"""Check 3: the loader alone, the model alone on batches in memory, and training fed by the loader."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch

from affectfast.batch import Batch
from affectfast.config import TrainConfig
from affectfast.dist import DistInfo
from affectfast.doctor.check import PASSED, Check, not_run
from affectfast.doctor.plan import Plan, sync
from affectfast.loaders import screen_labels


def endless(loader) -> Iterator[Batch]:
    """Batches of epoch after epoch, for timings longer than an epoch."""
    epoch = loader.epoch
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def timed(run: Callable[[int], None], plan: Plan, batch_size: int) -> list[float]:
    """images/s of ``plan.repeats`` timed ``run(plan.steps)`` after one ``run(plan.warmup)``."""
    run(plan.warmup)
    rates = []
    for _ in range(plan.repeats):
        sync(plan.device)
        start = time.perf_counter()
        run(plan.steps)
        sync(plan.device)
        rates.append(plan.steps * batch_size / (time.perf_counter() - start))
    return rates


def run_config(shards: Path, plan: Plan, batch_size: int, out: Path, **changes) -> TrainConfig:
    """The training config the checks build runs from: the node's defaults, at this size."""
    from affectfast.train import resolve_device

    config = TrainConfig(
        shards=shards,
        out=out,
        loader=plan.kind,
        batch_size=batch_size,
        image_size=plan.image_size,
        amp="auto" if plan.cuda else "off",
        device=plan.device.type,
        **changes,
    )
    return resolve_device(config, cuda=plan.cuda)[0]


def train_threads(config: TrainConfig, plan: Plan) -> int:
    """The DALI threads ``train`` gives ``config``'s loader on this device (train.loader_threads)."""
    from affectfast.train import loader_threads

    return loader_threads(config, DistInfo(device=plan.device))


def train_batch(run, batch: Batch) -> torch.Tensor:
    """What train_one_epoch does with each batch: screen its labels (no host sync), then step."""
    screen_labels(batch.labels, batch.masks)
    return run.step(run.ddp, batch)


@contextlib.contextmanager
def train_torch_threads(plan: Plan):
    """torch's intra-op threads as ``train`` sets them on this device, restored after."""
    from affectfast.train import set_torch_threads

    threads = torch.get_num_threads()
    set_torch_threads(DistInfo(device=plan.device))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_checked_run(config: TrainConfig, plan: Plan):
    """train.build_run on this device, with the CUDA numerics `affectfast train` sets."""
    from affectfast.train import build_run, set_cuda_numerics

    if plan.cuda:
        set_cuda_numerics(config.deterministic)
    return build_run(config, DistInfo(device=plan.device))


def measure_training(shards: Path, plan: Plan, batch_size: int, torch_compile: bool, work: Path):
    """images/s of the loader alone, the step on batches in memory, and the step fed by the loader."""
    if torch_compile:
        torch._dynamo.reset()  # compile this run afresh, not as a recompilation of the last
        # The first steps compile forward and backward: keep them out of the timed runs.
        plan = dataclasses.replace(plan, warmup=max(plan.warmup, 3))
    config = run_config(shards, plan, batch_size, work / "run", torch_compile=torch_compile)
    with train_torch_threads(plan):
        return _measure_training(config, plan, batch_size)


def _measure_training(config: TrainConfig, plan: Plan, batch_size: int) -> dict:
    run = build_checked_run(config, plan)
    run.ddp.train()
    stream = endless(run.train_loader)
    # The same batches, kept on the device (cloned: a loader may reuse its buffers).
    in_memory = [
        Batch(
            b.images.clone(),
            {t: v.clone() for t, v in b.labels.items()},
            {t: v.clone() for t, v in b.masks.items()},
        )
        for b in islice(stream, plan.steps)
    ]

    def loader_only(n):
        for batch in islice(stream, n):
            batch.images.sum()  # touch the pixels, so their copy and cast complete

    def fed(n):
        for batch in islice(stream, n):
            train_batch(run, batch)

    def memory(n):
        for i in range(n):
            train_batch(run, in_memory[i % len(in_memory)])

    row = {
        "batch_size": batch_size,
        "compile": config.torch_compile,
        "amp": config.amp,
        "dali_threads": train_threads(config, plan),
        "torch_threads": torch.get_num_threads(),
    }
    measurements = (("memory", memory), ("fed", fed))
    if not config.torch_compile:  # the loader is the same either way: time it once
        measurements = (("loader", loader_only),) + measurements
    for name, function in measurements:
        rates = timed(function, plan, batch_size)
        row[name] = statistics.median(rates)
        row[f"{name}_runs"] = rates
    row["overhead"] = row["memory"] / row["fed"]
    return row  # the run, its loader and the batches in memory go with this frame


def check_throughput(shards: Path, plan: Plan, work: Path, quick: bool) -> list[Check]:
    """The throughput rows, eager and compiled (compiled: skipped by --quick)."""
    criterion = (
        "measured (not judged): overhead = model-alone / loader-fed images/s; 1.0 means the loader "
        "costs training nothing, 2.0 that training waits on data half the time"
    )
    title = f"loader vs model throughput ({plan.kind}, {plan.image_size} px)"
    checks = []
    for compiled in (False, True):
        key = "throughput_compiled" if compiled else "throughput"
        name = f"{title}, torch.compile" if compiled else title
        if compiled and not plan.compile:
            checks.append(
                not_run(key, name, "--quick skips torch.compile", criterion),
            )
            continue
        rows = []
        for batch_size in plan.batch_sizes:
            rows.append(measure_training(shards, plan, batch_size, compiled, work))
            gc.collect()  # free one run's pipeline and device memory before the next is built
            if plan.cuda:
                torch.cuda.empty_cache()
        body = [
            f"{plan.kind}, amp {rows[0]['amp']}, {plan.image_size} px, as `affectfast train` "
            f"runs here: {rows[0]['dali_threads']} DALI threads (train's count on this device), "
            f"{rows[0]['torch_threads']} torch threads, each batch's labels screened, then the "
            f"step; median of {plan.repeats} timed runs of {plan.steps} steps after "
            f"{plan.warmup} warm-up steps (device synchronized around each timed run).",
            "",
            "| batch | loader alone | model alone (in memory) | training fed by the loader | "
            "overhead (memory / fed) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            loader = f"{r['loader']:,.0f}" if "loader" in r else "(as above)"
            body.append(
                f"| {r['batch_size']} | {loader} | {r['memory']:,.0f} | {r['fed']:,.0f} | "
                f"{r['overhead']:.2f}x |"
            )
        summary = "; ".join(
            f"batch {r['batch_size']}: fed {r['fed']:,.0f} vs memory {r['memory']:,.0f} images/s, "
            f"overhead {r['overhead']:.2f}x"
            for r in rows
        )
        checks.append(Check(key, name, PASSED, summary, criterion, {"rows": rows}, body))
    return checks
