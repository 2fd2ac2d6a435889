"""Check 4 (GPU): DALI's output buffers while torch holds them, and the training step's
synchronisation."""

from __future__ import annotations

import gc
from itertools import islice
from pathlib import Path

import torch

from affectfast.doctor.check import FAILED, PASSED, Check, no_cuda_reason, not_run
from affectfast.doctor.plan import WORK, Plan
from affectfast.doctor.throughput import build_checked_run, endless, run_config
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

SLEEP_CYCLES = 50_000_000  # torch.cuda._sleep per batch in the buffer check: ~25-35 ms at 1.5-2 GHz
SYNC_EVENTS = (
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaStreamWaitEvent",
)


def check_buffer_lifetime(shards: Path, plan: Plan, batches: int = 24, delay: int = 4) -> Check:
    """Does DALI (default executor) reuse an output buffer while torch still holds it?

    A reference pass records every val batch's checksum with the device synchronized after each.
    A second pass enqueues ``torch.cuda._sleep`` before consuming each batch (so DALI runs ahead),
    checksums it at once on the GPU, keeps it, and checksums it again ``delay`` batches later. Any
    difference means its memory changed under torch: a reused buffer, or a missing stream wait.
    """
    title = "DALI buffer lifetime (default executor, zero-copy outputs)"
    criterion = (
        "every held batch's checksum (float64 sum on the GPU) equals the reference pass, "
        f"immediately and {delay} batches later"
    )
    if not plan.cuda:
        return not_run("buffer_lifetime", title, no_cuda_reason(plan.device), criterion)
    # float32 out: finish_batch then neither copies nor casts, so torch holds DALI's own buffer.
    loader = build_loader(
        "dali-gpu",
        shards,
        "val",
        TASKS,
        plan.small_batch,
        image_size=plan.image_size,
        augment=None,
        device=plan.device,
        dtype=torch.float32,
        num_threads=plan.loader_threads,
    )
    reference = []
    for batch in islice(loader, batches):
        torch.cuda.synchronize(plan.device)
        reference.append(batch.images.sum(dtype=torch.float64).item())
    exec_dynamic = loader._batches._pipes[0].exec_dynamic  # the iterator of that pass
    held, immediate, late = [], [], []
    for i, batch in enumerate(islice(loader, batches)):  # abandoned epoch: a rebuilt pipeline
        torch.cuda._sleep(SLEEP_CYCLES)
        immediate.append(batch.images.sum(dtype=torch.float64))
        held.append(batch.images)
        if i >= delay:
            late.append(held[i - delay].sum(dtype=torch.float64))
            held[i - delay] = None
    torch.cuda.synchronize(plan.device)
    immediate = [s.item() for s in immediate]
    late = [s.item() for s in late]
    n = min(len(reference), len(immediate))
    # Against the reference, allow decoder jitter (1e-6 per value; another batch's pixels, even one
    # frame of them, move the sum by far more); the same memory summed twice must match exactly.
    slack = 1e-6 * plan.small_batch * 3 * plan.image_size**2
    bad_now = [i for i in range(n) if abs(immediate[i] - reference[i]) > slack]
    bad_late = [i for i in range(len(late)) if late[i] != immediate[i]]
    details = {
        "batches": n,
        "delay": delay,
        "sleep_cycles": SLEEP_CYCLES,
        "exec_dynamic": exec_dynamic,
        "mismatch_immediate": bad_now,
        "mismatch_late": bad_late,
    }
    body = [
        f"- val split, batch {plan.small_batch}, float32 (no cast: torch holds DALI's buffers), "
        f"executor exec_dynamic={exec_dynamic}; {n} batches, torch.cuda._sleep({SLEEP_CYCLES}) "
        f"before each, held for {delay} batches.",
        f"- checksums differing from the reference at once: {len(bad_now)}; "
        f"{delay} batches later: {len(bad_late)}.",
    ]
    ok = not bad_now and not bad_late and n > delay
    summary = (
        f"{n} batches held {delay} batches each: checksums unchanged"
        if ok
        else f"{len(bad_now)} batches differ at once, {len(bad_late)} later (of {n})"
        + ("" if n > delay else f": too few val batches ({n}) for the test")
    )
    return Check(
        "buffer_lifetime", title, PASSED if ok else FAILED, summary, criterion, details, body
    )


def check_sync_profile(shards: Path, plan: Plan, out: Path, steps: int = 5) -> Check:
    """torch.profiler over a few steady-state training steps: synchronisations per step."""
    title = "synchronisation per training step (torch.profiler)"
    criterion = "no cudaDeviceSynchronize in a steady-state step (stream and event waits reported)"
    if not plan.cuda:
        return not_run("sync_profile", title, no_cuda_reason(plan.device), criterion)
    from torch.profiler import ProfilerActivity, profile

    config = run_config(shards, plan, plan.batch_sizes[0], out / WORK / "run")
    run = build_checked_run(config, plan)
    stream = endless(run.train_loader)
    for batch in islice(stream, plan.warmup + 2):
        run.step(run.ddp, batch)
    torch.cuda.synchronize(plan.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in islice(stream, steps):
            run.step(run.ddp, batch)
    trace = out / "trace_train_steps.json"
    prof.export_chrome_trace(str(trace))
    counts = {name: 0 for name in SYNC_EVENTS}
    for event in prof.key_averages():
        if event.key in counts:
            counts[event.key] += event.count
    per_step = {name: count / steps for name, count in counts.items()}
    del run, stream, prof
    gc.collect()
    body = [
        f"- {steps} steps of training fed by {plan.kind} (batch {plan.batch_sizes[0]}, amp "
        f"{config.amp}) after {plan.warmup + 2} warm-up steps; trace: `{trace.name}` (open in "
        "chrome://tracing or Perfetto). Counts are CUPTI's CUDA runtime records for the whole "
        "process; calls DALI makes through the driver API directly are not among them.",
        "",
        "| CUDA runtime call | per step |",
        "|---|---|",
        *(f"| {name} | {value:.1f} |" for name, value in per_step.items()),
    ]
    ok = per_step["cudaDeviceSynchronize"] == 0
    summary = ", ".join(f"{n.removeprefix('cuda')} {v:.1f}" for n, v in per_step.items())
    return Check(
        "sync_profile",
        title,
        PASSED if ok else FAILED,
        f"per step: {summary}",
        criterion,
        {"per_step": per_step, "steps": steps, "trace": trace.name},
        body,
    )
