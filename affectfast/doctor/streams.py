"""Check 4 (GPU): DALI's output buffers while torch holds or still reads them (4a), and whether the
training step ever makes the host wait for the GPU (4b)."""

from __future__ import annotations

import functools
import gc
import traceback
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch

from affectfast.doctor.check import FAILED, PASSED, Check, no_cuda_reason, not_run
from affectfast.doctor.plan import WORK, Plan
from affectfast.doctor.throughput import build_checked_run, endless, run_config, train_batch
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

SLEEP_CYCLES = 50_000_000  # torch.cuda._sleep per batch in the buffer check: ~25-35 ms at 1.5-2 GHz
SYNC_EVENTS = (
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaStreamWaitEvent",
)
# The two ways training reads DALI's output: float32 as DALI wrote it (torch holds DALI's own
# buffer), and a cast to bfloat16 on torch's stream (DALI's buffer is dropped at once).
LIFETIME_DTYPES = (torch.float32, torch.bfloat16)
HOST_WAIT = "called a synchronizing CUDA operation"  # torch's error in sync debug mode "error"
PACKAGE = Path(__file__).resolve().parents[1]  # affectfast/


def checksum(images: torch.Tensor) -> torch.Tensor:
    """A float64 sum on the images' device, queued on torch's current stream (no host sync)."""
    return images.sum(dtype=torch.float64)


def lifetime_pass(shards: Path, plan: Plan, dtype: torch.dtype, batches: int, delay: int) -> dict:
    """One output path of the buffer check: checksums of the first ``batches`` val batches in a
    reference pass and in a pass where DALI runs ahead of torch; which ones differ."""
    loader = build_loader(
        "dali-gpu",
        shards,
        "val",
        TASKS,
        plan.small_batch,
        image_size=plan.image_size,
        augment=None,
        device=plan.device,
        dtype=dtype,
        num_threads=plan.loader_threads,
    )
    reference = []
    for batch in islice(loader, batches):  # the device synchronized before each checksum
        torch.cuda.synchronize(plan.device)
        reference.append(checksum(batch.images).item())
    # The held pass (the abandoned epoch above makes the loader build its pipeline afresh). Each
    # batch is checksummed as soon as it is handed over; then torch.cuda._sleep keeps torch's
    # stream busy, so the host (and DALI with it) runs ahead of the GPU work that reads the
    # batches: the next batch's cast (bfloat16) reads DALI's buffer long after the host dropped
    # it, and every batch is checksummed again `delay` batches later.
    now, later, held = [], [], {}
    for i, batch in enumerate(islice(loader, batches)):
        now.append(checksum(batch.images))
        torch.cuda._sleep(SLEEP_CYCLES)
        held[i] = batch.images
        if i >= delay:
            later.append(checksum(held.pop(i - delay)))
    torch.cuda.synchronize(plan.device)
    now, later = [s.item() for s in now], [s.item() for s in later]
    n = min(len(reference), len(now))
    # Against the reference, allow decoder jitter (1e-6 per value; another batch's pixels, even one
    # frame of them, move the sum by far more); the same memory summed twice must match exactly.
    slack = 1e-6 * plan.small_batch * 3 * plan.image_size**2
    return {
        "batches": n,
        "mismatch_now": [i for i in range(n) if abs(now[i] - reference[i]) > slack],
        "mismatch_later": [i for i in range(len(later)) if later[i] != now[i]],
        "exec_dynamic": loader.pipeline().exec_dynamic,  # a fresh pipeline of the same settings
    }


def check_buffer_lifetime(shards: Path, plan: Plan, batches: int = 24, delay: int = 4) -> Check:
    """Does DALI write into an output buffer while torch still holds it, or has yet to read it?

    Two paths, each against a reference pass that synchronizes the device after every batch:
    float32 (torch holds DALI's own buffer, no copy, for ``delay`` batches) and bfloat16, what
    training reads (the loader casts on torch's stream and drops DALI's buffer at once, while the
    cast is still queued behind ``torch.cuda._sleep``). A checksum that differs from the reference
    means DALI wrote memory torch had yet to read.

    It does not prove that torch's stream waits for DALI's work before reading a batch: the first
    checksum is queued right after the hand-over, so a missing wait *may* show there, but DALI's
    work can be done by the time it runs.
    """
    title = "DALI output buffers while torch holds or still reads them"
    criterion = (
        "float32 (torch holds DALI's buffer) and bfloat16 (cast on torch's stream after DALI's "
        "buffer is dropped): every batch's checksum (float64 sum on the GPU) equals the reference "
        f"pass, at once and {delay} batches later, while torch.cuda._sleep lets DALI run ahead"
    )
    if not plan.cuda:
        return not_run("buffer_lifetime", title, no_cuda_reason(plan.device), criterion)
    passes = {}
    for dtype in LIFETIME_DTYPES:
        passes[str(dtype).removeprefix("torch.")] = lifetime_pass(
            shards, plan, dtype, batches, delay
        )
        gc.collect()  # the pass's loader and pipelines
    problems = [
        f"{name}: {len(p['mismatch_now'])} batches differ at once, {len(p['mismatch_later'])} "
        f"{delay} batches later (of {p['batches']})"
        for name, p in passes.items()
        if p["mismatch_now"] or p["mismatch_later"]
    ]
    problems += [
        f"{name}: too few val batches ({p['batches']}) to hold {delay}"
        for name, p in passes.items()
        if p["batches"] <= delay
    ]
    body = [
        f"- val split, batch {plan.small_batch}, {plan.image_size} px, no augmentation; "
        f"torch.cuda._sleep({SLEEP_CYCLES}) after each batch's first checksum; each batch held "
        f"{delay} batches.",
        "- What it cannot prove: that torch's stream waits for DALI's work before reading a "
        "batch (DALI's work may be done by the time torch's first checksum runs).",
        "",
        "| output | executor exec_dynamic | batches | differ at once | differ later |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {p['exec_dynamic']} | {p['batches']} | {len(p['mismatch_now'])} | "
            f"{len(p['mismatch_later'])} |"
            for name, p in passes.items()
        ),
    ]
    summary = (
        "; ".join(problems)
        if problems
        else ", ".join(f"{name}: {p['batches']} batches" for name, p in passes.items())
        + f", each held {delay} batches: checksums unchanged"
    )
    details = {"passes": passes, "delay": delay, "sleep_cycles": SLEEP_CYCLES}
    return Check(
        "buffer_lifetime",
        title,
        FAILED if problems else PASSED,
        summary,
        criterion,
        details,
        body,
    )


def first_host_wait(steps: Callable[[], None]) -> str | None:
    """Run ``steps`` under ``torch.cuda.set_sync_debug_mode("error")``: None when no torch
    operation in it made the host wait for the GPU, else where the first one did.

    The mode is torch's (c10's stream and memcpy-and-sync wrappers check it): a waiting torch call
    on any thread raises, while CUDA calls other libraries make directly (DALI's threads) do not.
    """
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    except RuntimeError as error:
        if HOST_WAIT not in str(error):
            raise
        return _where(error)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return None


def _where(error: BaseException) -> str:
    """The Python line whose call waited (the innermost frame of ``error``'s traceback), and the
    innermost affectfast line above it where that is elsewhere (in torch, say)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if Path(f.filename).is_relative_to(PACKAGE)]

    def line(frame) -> str:
        return f"{frame.filename}:{frame.lineno} ({frame.name}: {frame.line})"

    if not ours or ours[-1] is frames[-1]:
        return line(frames[-1])
    return f"{line(frames[-1])}, called from {line(ours[-1])}"


def run_batches(run, stream, count: int, per_batch: Callable) -> None:
    """Fetch ``count`` batches from ``stream`` and hand each to ``per_batch(run, batch)``."""
    for batch in islice(stream, count):
        per_batch(run, batch)


def check_sync_profile(
    shards: Path,
    plan: Plan,
    out: Path,
    steps: int = 5,
    per_batch: Callable = train_batch,
) -> Check:
    """Steady-state training steps (fetch + ``per_batch``, what train does per batch) under torch's
    sync debug mode: the step must never make the host wait for the GPU. A torch.profiler trace of
    as many further steps is saved, with the whole process's synchronisation calls counted."""
    from torch.profiler import ProfilerActivity, profile

    title = "host waits in a training step (torch sync debug mode, torch.profiler)"
    criterion = (
        f"no torch operation in {steps} steady-state steps (fetching the batch included) makes "
        'the host wait for the GPU (torch.cuda.set_sync_debug_mode("error") raises none); the '
        "profiler's counts, DALI's own threads included, are reported, not judged"
    )
    if not plan.cuda:
        return not_run("sync_profile", title, no_cuda_reason(plan.device), criterion)
    config = run_config(shards, plan, plan.batch_sizes[0], out / WORK / "run")
    run = build_checked_run(config, plan)
    stream = endless(run.train_loader)
    run_batches(run, stream, plan.warmup + 2, per_batch)
    torch.cuda.synchronize(plan.device)
    waited = first_host_wait(functools.partial(run_batches, run, stream, steps, per_batch))
    # The trace: as many further steps, apart, so that nothing the profiler does counts above.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_batches(run, stream, steps, per_batch)
        torch.cuda.synchronize(plan.device)
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
        f"{config.amp}) after {plan.warmup + 2} warm-up steps, each as train runs it (fetch, "
        "screen labels, step), under torch's sync debug mode: "
        + ("no torch operation waited on the GPU." if waited is None else f"waited at {waited}."),
        "- Not covered by the debug mode: CUDA calls DALI makes itself. Its deferred buffer "
        "release runs on DALI's own thread (its cudaDeviceSynchronize does not hold up the "
        "training thread); a wait inside DALI's hand-over to the training thread is visible only "
        "in the trace.",
        f"- trace of {steps} further steps: `{trace.name}` (chrome://tracing or Perfetto). The "
        "counts below are CUPTI's CUDA runtime records for the whole process, every thread (the "
        "one synchronize doctor makes after the steps included); calls made through the driver "
        "API are not among them.",
        "",
        "| CUDA runtime call | per step |",
        "|---|---|",
        *(f"| {name} | {value:.1f} |" for name, value in per_step.items()),
    ]
    counted = ", ".join(f"{n.removeprefix('cuda')} {v:.1f}" for n, v in per_step.items())
    summary = (
        f"no host wait in {steps} steps; profiler, whole process, per step: {counted}"
        if waited is None
        else f"the step made the host wait for the GPU at {waited}"
    )
    return Check(
        "sync_profile",
        title,
        PASSED if waited is None else FAILED,
        summary,
        criterion,
        {"host_wait": waited, "per_step": per_step, "steps": steps, "trace": trace.name},
        body,
    )
