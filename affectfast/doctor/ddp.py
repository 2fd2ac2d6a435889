"""Check 7: two processes under torchrun (gloo on the CPU, NCCL on two GPUs).

``python -m affectfast.doctor ddp-worker ...`` runs :func:`ddp_worker` in each process: it counts
train batches per rank, writes the val outputs both ranks gather (train's validation path) for the
model train starts from, and trains the first epoch; a second launch resumes to epoch 2. The
gathered outputs are compared with one process's, frame by frame, in float32 with deterministic
kernels: thresholded metrics (F1) are not compared, since a rounding difference at a threshold
flips them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from affectfast.config import AugmentSpec, TrainConfig
from affectfast.dist import DistInfo
from affectfast.doctor.check import FAILED, PASSED, Check, no_cuda_reason, not_run
from affectfast.doctor.plan import WORK, Plan
from affectfast.loaders import build_loader
from affectfast.metrics import Predictions
from affectfast.tasks import TASKS

# |DDP - one process| per output value, float32 on both sides: at most ATOL + RTOL * |one process|.
# Only batch composition differs (each rank's own last batch), so only kernel choices per shape do.
OUTPUT_RTOL, OUTPUT_ATOL = 1e-3, 1e-4
OUTPUTS = "val_outputs.npz"  # the gathered DDP outputs, written by rank 0
DDP_TIMEOUT_S = 300  # one torchrun launch; longer counts as a hang


def ddp_train_config(
    shards: Path, out: Path, batch_size: int, image_size: int, cuda: bool
) -> TrainConfig:
    """The 2-epoch run both torchrun launches share (the second resumes the first)."""
    return TrainConfig(
        shards=shards,
        out=out,
        loader="dali-gpu" if cuda else "dali-cpu",
        epochs=2,
        batch_size=batch_size,
        image_size=image_size,
        amp="bf16" if cuda else "off",
        device="cuda" if cuda else "cpu",
        num_threads=1,
    )


def ddp_worker(shards: Path, out: Path, cuda: bool, batch_size: int, image_size: int) -> None:
    """One torchrun process: count train batches per epoch with a collective after each (as DDP's
    backward has), write every rank's counts, then train the first of two epochs."""
    import torch.distributed as dist

    from affectfast.dist import gather_objects, setup_distributed
    from affectfast.train import train

    info = setup_distributed(cuda)
    loader = build_loader(
        "dali-gpu" if cuda else "dali-cpu",
        shards,
        "train",
        TASKS,
        batch_size,
        image_size=image_size,
        augment=AugmentSpec(),
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        num_threads=1,
    )
    counts = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        count = 0
        for _ in loader:
            count += 1
            dist.all_reduce(torch.ones(1, device=info.device))  # a rank short of batches hangs
        counts.append(count)
    rows = gather_objects({"rank": info.rank, "batches": counts, "expected": len(loader)}, info)
    if info.is_main:
        (out / "batch_counts.json").write_text(json.dumps(rows))
    del loader
    config = ddp_train_config(shards, out / "run", batch_size, image_size, cuda)
    outputs = initial_outputs(config, info)
    if info.is_main:
        save_outputs(outputs, out / OUTPUTS)
    # train() joins the group already formed (setup_distributed sees it) and leaves it at the end.
    train(config, stop_after=1)


@contextlib.contextmanager
def deterministic_numerics(cuda: bool):
    """cuDNN and matmul settings for reproducible float32 (no TF32, no autotuning), restored
    after (``train`` sets its own at its start)."""
    flags = (
        (torch.backends.cudnn, "benchmark", False),
        (torch.backends.cudnn, "deterministic", True),
        (torch.backends.cudnn, "allow_tf32", False),
        (torch.backends.cuda.matmul, "allow_tf32", False),
    )
    saved = [getattr(owner, name) for owner, name, _ in flags]
    try:
        if cuda:
            for owner, name, value in flags:
                setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def initial_outputs(config: TrainConfig, info: DistInfo) -> Predictions:
    """Every val frame's outputs from the model ``train`` starts ``config``'s run with (its seed),
    in float32 with deterministic kernels, gathered over the ranks by train's own validation pass
    (``predict_split``)."""
    from affectfast.model import build_model
    from affectfast.train import build_autocast, build_eval_loader, predict_split

    config = dataclasses.replace(config, amp="off")  # float32 images and model, no autocast
    torch.manual_seed(config.seed)  # as train.build_run: the same initial weights
    model = build_model(config.tasks, config.init).to(
        info.device, memory_format=torch.channels_last
    )
    loader = build_eval_loader(config, config.shards, "val", info, config.batch_size)
    with deterministic_numerics(info.device.type == "cuda"):
        return predict_split(model, loader, build_autocast(info.device, "off"), info)


def save_outputs(preds: Predictions, path: Path) -> None:
    """``preds`` as one .npz: keys, and outputs, labels and masks per task."""
    arrays = {"keys": np.asarray(preds.keys, dtype=str)}
    for name in ("outputs", "labels", "masks"):
        arrays.update({f"{name}_{t}": v for t, v in getattr(preds, name).items()})
    np.savez(path, **arrays)


def load_outputs(path: Path) -> Predictions:
    """What :func:`save_outputs` wrote."""
    with np.load(path, allow_pickle=False) as data:
        parts = {name: {} for name in ("outputs", "labels", "masks")}
        for entry in data.files:
            name, _, task = entry.partition("_")
            if name in parts:
                parts[name][task] = data[entry]
        return Predictions([str(k) for k in data["keys"]], **parts)


def compare_outputs(ddp: Predictions, single: Predictions) -> list[str]:
    """What differs between the outputs DDP gathered and one process's: keys (every frame once),
    labels and masks (exactly), outputs (within OUTPUT_ATOL + OUTPUT_RTOL * |one process|)."""
    if ddp.keys != single.keys:
        missing = len(set(single.keys) - set(ddp.keys))
        extra = len(set(ddp.keys) - set(single.keys))
        return [
            f"DDP gathered {len(ddp.keys)} val frames, one process {len(single.keys)} "
            f"({missing} missing, {extra} not in one process's)"
        ]
    problems = []
    for task, expected in single.outputs.items():
        got = ddp.outputs.get(task)
        if got is None or got.shape != expected.shape:
            problems.append(f"{task} outputs: shape {None if got is None else got.shape}")
            continue
        if not np.allclose(got, expected, rtol=OUTPUT_RTOL, atol=OUTPUT_ATOL):
            worst = int(np.abs(got - expected).max(axis=tuple(range(1, got.ndim))).argmax())
            problems.append(
                f"{task} outputs differ by up to {np.abs(got - expected).max():.3g} "
                f"(frame {single.keys[worst]})"
            )
        same_labels = np.array_equal(ddp.labels[task], single.labels[task])
        if not (same_labels and np.array_equal(ddp.masks[task], single.masks[task])):
            problems.append(f"{task} labels or masks differ")
    return problems


def torchrun(args: list[str], nproc: int, log: Path) -> tuple[int | None, float]:
    """Run ``python -m torch.distributed.run`` with ``nproc`` processes; (exit code or None on a
    timeout, seconds). Its output goes to ``log``; a hung launch is killed with its process group."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=DDP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: our group only
            process.wait()
            code = None
    return code, time.perf_counter() - start


def check_ddp(shards: Path, plan: Plan, out: Path, cuda: bool = False) -> Check:
    """Two processes under torchrun (gloo on the CPU, or NCCL on two GPUs): see the module docstring."""
    from affectfast.rundir import read_metrics

    key, title = (
        ("ddp_gpus", "torchrun, 2 GPUs (NCCL)")
        if cuda
        else ("ddp_gloo", "torchrun, 2 CPU processes (gloo)")
    )
    criterion = (
        f"equal train batches on both ranks in 2 epochs; each launch ends within {DDP_TIMEOUT_S} s "
        "(else: a hang); --resume continues from epoch 1 to 2 (metrics.jsonl holds epochs 1 and "
        "2, and train's validation counted as many valid frames per task as one process); the val "
        "outputs both ranks gather equal one process's: the same keys, labels and masks exactly, "
        f"every output within {OUTPUT_ATOL:g} + {OUTPUT_RTOL:g} x |one process| (float32, "
        "deterministic kernels, the model train starts from)"
    )
    if cuda and not plan.cuda:
        return not_run(key, title, no_cuda_reason(plan.device), criterion)
    if cuda and torch.cuda.device_count() < 2:
        return not_run(key, title, "one GPU", criterion)
    folder = out / WORK / key
    if folder.exists():
        shutil.rmtree(folder)  # doctor's own folder from an earlier report: start the run afresh
    folder.mkdir(parents=True)
    config = ddp_train_config(shards, folder / "run", plan.ddp_batch, plan.ddp_image_size, cuda)
    first = [
        "-m",
        "affectfast.doctor",
        "ddp-worker",
        str(shards),
        str(folder),
        "cuda" if cuda else "cpu",
        str(plan.ddp_batch),
        str(plan.ddp_image_size),
    ]
    resume = [
        "-m",
        "affectfast",
        "train",
        str(shards),
        "--out",
        str(config.out),
        "--resume",
        *("--epochs", "2", "--batch-size", str(config.batch_size)),
        *("--image-size", str(config.image_size), "--amp", config.amp),
        *("--loader", config.loader, "--device", config.device, "--num-threads", "1"),
    ]
    details: dict = {"rtol": OUTPUT_RTOL, "atol": OUTPUT_ATOL, "folder": str(folder)}
    problems = []
    for name, args in (("first", first), ("resume", resume)):
        code, seconds = torchrun(args, 2, folder / f"{name}.log")
        details[f"{name}_seconds"] = seconds
        if code != 0:
            log_tail = (folder / f"{name}.log").read_text()[-1500:]
            what = (
                f"timed out after {DDP_TIMEOUT_S} s (a hang?)" if code is None else f"exit {code}"
            )
            return Check(
                key,
                title,
                FAILED,
                f"the {name} torchrun launch {what}; log: {folder / (name + '.log')}",
                criterion,
                {**details, "log_tail": log_tail},
                ["```", log_tail, "```"],
            )
    counts = json.loads((folder / "batch_counts.json").read_text())
    details["batch_counts"] = counts
    if len({tuple(r["batches"]) for r in counts}) != 1 or any(
        b != r["expected"] for r in counts for b in r["batches"]
    ):
        problems.append(f"batch counts differ: {counts}")
    records = read_metrics(config.out / "metrics.jsonl")
    details["epochs"] = [r["epoch"] for r in records]
    if details["epochs"] != [1, 2]:
        problems.append(f"metrics.jsonl holds epochs {details['epochs']}, not [1, 2]")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    single = initial_outputs(config, DistInfo(device=device))
    gathered = load_outputs(folder / OUTPUTS)
    problems += compare_outputs(gathered, single)
    details["val_frames"] = {"ddp": len(gathered), "one_process": len(single)}
    details["max_abs_diff"] = {
        t: float(np.abs(gathered.outputs[t] - v).max())
        for t, v in single.outputs.items()
        if len(gathered) == len(single) and t in gathered.outputs
    }
    frames = {
        t: (records[-1].get(f"frames_{t}") if records else None, int(m.sum()))
        for t, m in single.masks.items()
    }
    details["val_frames_per_task"] = frames
    if any(a != b for a, b in frames.values()):
        problems.append(f"train's validation counted other val frames (DDP, one process): {frames}")
    body = [
        f"- launches: first (count, gathered outputs, epoch 1) {details['first_seconds']:.0f} s, "
        f"resume (epoch 2) {details['resume_seconds']:.0f} s; batch {config.batch_size}, "
        f"{config.image_size} px, {config.loader}; logs in `{folder}`.",
        "- train batches per rank and epoch: "
        + ", ".join(f"rank {r['rank']}: {r['batches']} (expected {r['expected']})" for r in counts),
        f"- val outputs gathered over 2 ranks vs one process: {len(gathered)} vs {len(single)} "
        "frames; largest |diff| per task: "
        + ", ".join(f"{t} {d:.2g}" for t, d in details["max_abs_diff"].items()),
    ]
    largest = max(details["max_abs_diff"].values(), default=float("nan"))
    summary = (
        f"equal batches {counts[0]['batches']} on both ranks, no hang, resumed to epoch 2, "
        f"{len(single)} val outputs gathered equal one process's (max |diff| {largest:.1g})"
        if not problems
        else "; ".join(problems)
    )
    return Check(key, title, FAILED if problems else PASSED, summary, criterion, details, body)


def main(argv: list[str]) -> None:
    """``python -m affectfast.doctor ddp-worker SHARDS FOLDER DEVICE BATCH SIZE`` (torchrun's)."""
    if len(argv) != 6 or argv[0] != "ddp-worker":
        raise SystemExit("usage: python -m affectfast.doctor ddp-worker SHARDS FOLDER cpu|cuda B S")
    _, shards, folder, device, batch, size = argv
    ddp_worker(Path(shards), Path(folder), device == "cuda", int(batch), int(size))
