"""``run_doctor``: every check in order, each guarded, then the report."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from affectfast.console import say
from affectfast.doctor.check import FAILED, GPU_ONLY, NOT_RUN, Check
from affectfast.doctor.ddp import check_ddp
from affectfast.doctor.decode import check_decode
from affectfast.doctor.environment import check_environment
from affectfast.doctor.epochs import check_epochs
from affectfast.doctor.parity import check_pixel_parity
from affectfast.doctor.plan import SMALL_SYNTH, WORK, DoctorConfig, make_plan
from affectfast.doctor.report import check_report_folder, claim_report_folder, write_report
from affectfast.doctor.streams import check_buffer_lifetime, check_sync_profile
from affectfast.doctor.throughput import check_throughput
from affectfast.errors import DataError


def resolve_doctor_device(device: str, out: Path) -> torch.device:
    """auto: cuda when torch.cuda.is_available(), else cpu; cuda without CUDA is an error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError(out, "--device cuda, but no CUDA device is visible here")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def work_pack(out: Path, synth: tuple[int, int, int]) -> Path:
    """A synthetic pack of (videos, frames, px) in ``out/work`` (reused when doctor made it before)."""
    from affectfast.pack import PackConfig, pack
    from affectfast.synth import SynthConfig, synthesize

    videos, frames, size = synth
    folder = out / WORK / f"synth-v{videos}-f{frames}-s{size}"
    shards = folder / "shards"
    if not (shards / "manifest.json").exists():
        workers = len(os.sched_getaffinity(0))
        say(f"doctor: synthesizing {videos} videos x {frames} frames at {size} px into {folder}")
        synthesize(
            SynthConfig(
                out=folder / "tree",
                videos=videos,
                frames=frames,
                seed=0,
                image_size=size,
                workers=workers,
                overwrite=True,  # doctor's own folder; the tree is the same bytes for the seed
            )
        )
        pack(
            PackConfig(root=folder / "tree", out=shards, workers=workers, shard_size=1000, seed=0),
            progress=False,
        )
    return shards


def guarded(number: str, title: str, function: Callable, *args, **kwargs) -> list[Check]:
    """Run one check function; an exception becomes a failed check naming it, never a crash.

    A function returning several rows numbers them ``number`` + a, b, ...
    """
    start = time.perf_counter()
    say(f"doctor: {number}. {title} ...")
    try:
        result = function(*args, **kwargs)
        checks = result if isinstance(result, list) else [result]
    except Exception as error:  # noqa: BLE001 - the report must say what broke and go on
        checks = [
            Check(
                function.__name__.removeprefix("check_"),
                title,
                FAILED,
                f"error: {type(error).__name__}: {error}".splitlines()[0][:300],
                details={"traceback": traceback.format_exc()},
                body=["```", traceback.format_exc()[-3000:], "```"],
            )
        ]
    ran = [c for c in checks if c.status != NOT_RUN] or checks
    for letter, check in zip("abcdefgh", checks):
        check.number = f"{number}{letter}" if len(checks) > 1 else number
        ran_it = any(check is r for r in ran)
        check.seconds = (time.perf_counter() - start) / len(ran) if ran_it else 0.0
        say(f"doctor: {check.number}. {check.title}: {check.status}: {check.summary}")
    return checks


def enforce_gpu_only(checks: list[Check], device: torch.device) -> None:
    """Without CUDA a GPU-only check can only be "not run": anything else is doctor's own bug,
    reported as a failure rather than a pass."""
    if device.type == "cuda":
        return
    for check in checks:
        if check.key in GPU_ONLY and check.status != NOT_RUN:
            check.status = FAILED
            check.summary = f"doctor bug: a GPU-only check reported {check.summary!r} on {device}"


def run_doctor(config: DoctorConfig) -> list[Check]:
    """Run every check, write report.md and report.json into ``config.out``; return the checks."""
    started = datetime.now(UTC)
    clock = time.perf_counter()
    out = config.out
    device = resolve_doctor_device(config.device, out)
    plan = make_plan(device, config.quick)
    check_report_folder(out)  # before any work: never over a folder of the user's files
    claim_report_folder(out)
    synthesized = work_pack(out, plan.synth)  # checks 2-5 without SHARDS; always check 6
    small = work_pack(out, SMALL_SYNTH)  # check 7 (the same pack on the CPU)
    shards = config.shards or synthesized
    work = out / WORK
    checks = guarded("1", "environment", check_environment, device, out)
    train_shards = str(config.shards) if config.shards is not None else "SHARDS"
    checks += guarded("2", "decode-only throughput", check_decode, shards, plan, train_shards)
    checks += guarded("3", "throughput", check_throughput, shards, plan, work, config.quick)
    checks += guarded("4a", "DALI output buffers", check_buffer_lifetime, shards, plan)
    checks += guarded("4b", "host waits in a training step", check_sync_profile, shards, plan, out)
    checks += guarded("5", "pixel parity", check_pixel_parity, shards, plan)
    checks += guarded("6", "epochs of the train loader", check_epochs, synthesized, plan)
    checks += guarded("7a", "torchrun, gloo", check_ddp, small, plan, out, cuda=False)
    checks += guarded("7b", "torchrun, GPUs", check_ddp, small, plan, out, cuda=True)
    enforce_gpu_only(checks, device)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - clock,
        "device": str(device),
        "quick": config.quick,
        "shards": str(shards),
        "shards_given": config.shards is not None,
        "epochs_pack": str(synthesized),
        "ddp_pack": str(small),
    }
    write_report(checks, meta, out)
    return checks
