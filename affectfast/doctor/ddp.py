"""Check 7: two processes under torchrun (gloo on the CPU, NCCL on two GPUs).

``python -m affectfast.doctor ddp-worker ...`` runs :func:`ddp_worker` in each process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from affectfast.config import AugmentSpec, EvalConfig, TrainConfig
from affectfast.doctor.check import FAILED, PASSED, Check, no_cuda_reason, not_run
from affectfast.doctor.plan import WORK, Plan
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

DDP_METRIC_TOLERANCE = {"cpu": 1e-5, "cuda": 5e-3}  # |DDP - one process| per metric (bf16 on GPU)
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
    # train() joins the group already formed (setup_distributed sees it) and leaves it at the end.
    train(ddp_train_config(shards, out / "run", batch_size, image_size, cuda), stop_after=1)


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
    from affectfast.predict import evaluate
    from affectfast.rundir import read_metrics

    key, title = (
        ("ddp_gpus", "torchrun, 2 GPUs (NCCL)")
        if cuda
        else ("ddp_gloo", "torchrun, 2 CPU processes (gloo)")
    )
    tolerance = DDP_METRIC_TOLERANCE["cuda" if cuda else "cpu"]
    criterion = (
        f"equal train batches on both ranks in 2 epochs; each launch ends within {DDP_TIMEOUT_S} s "
        "(else: a hang); --resume continues from epoch 1 to 2; metrics equal a one-process "
        f"evaluate of last.pt within {tolerance:g} (frame counts exactly)"
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
    details: dict = {"tolerance": tolerance, "folder": str(folder)}
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
    single = evaluate(
        EvalConfig(config.out / "last.pt", shards, loader=config.loader, batch_size=64)
    )
    names = [k for k in ("ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "p_mtl") if k in single]
    gaps = {k: abs(records[-1][k] - single[k]) for k in names}
    details["metric_gaps"] = gaps
    if any(g > tolerance for g in gaps.values()):
        problems.append(f"metrics differ from one process by more than {tolerance:g}: {gaps}")
    frames = {t: (records[-1].get(f"frames_{t}"), single.get(f"frames_{t}")) for t in TASKS}
    if any(a != b for a, b in frames.values()):
        problems.append(f"val frames counted differ (DDP, one process): {frames}")
    body = [
        f"- launches: first (count + epoch 1) {details['first_seconds']:.0f} s, resume "
        f"(epoch 2) {details['resume_seconds']:.0f} s; batch {config.batch_size}, "
        f"{config.image_size} px, {config.loader}; logs in `{folder}`.",
        "- train batches per rank and epoch: "
        + ", ".join(f"rank {r['rank']}: {r['batches']} (expected {r['expected']})" for r in counts),
        f"- largest metric gap to one process: {max(gaps.values()):.2g}" if gaps else "",
    ]
    summary = (
        f"equal batches {counts[0]['batches']} on both ranks, no hang, resumed to epoch 2, "
        f"metrics match one process (max gap {max(gaps.values()):.1g})"
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
