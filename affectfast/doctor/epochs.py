"""Check 6: epochs of the train loader: time to the first batch, threads and memory after each."""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path

import torch

from affectfast.config import AugmentSpec
from affectfast.doctor.check import FAILED, PASSED, Check
from affectfast.doctor.plan import Plan, sync
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

DEVICE_MEMORY_GROWTH_MIB = 64  # GPU memory in use (DALI's pools included) may settle by this much
RSS_GROWTH_MIB = 128  # process RSS may settle by this much (allocator arenas), epoch 2 -> last


def thread_count() -> int:
    """Threads of this process."""
    return len(os.listdir("/proc/self/task"))


def rss_mib() -> float:
    """Resident set size of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def check_epochs(shards: Path, plan: Plan) -> Check:
    """``plan.epochs`` epochs of the train loader: time to the first batch, threads and memory after
    each; growth from the second epoch to the last is a leak."""
    title = f"{plan.epochs} epochs of the train loader ({plan.kind})"
    criterion = (
        "from epoch 2 to the last: threads do not grow, torch's allocated CUDA memory does not "
        f"grow, GPU memory in use grows < {DEVICE_MEMORY_GROWTH_MIB} MiB, RSS grows < "
        f"{RSS_GROWTH_MIB} MiB"
    )
    loader = build_loader(
        plan.kind,
        shards,
        "train",
        TASKS,
        plan.small_batch,
        image_size=plan.image_size,
        augment=AugmentSpec(),
        device=plan.device,
        dtype=torch.bfloat16 if plan.cuda else torch.float32,
        num_threads=plan.loader_threads,
    )
    rows = []
    for epoch in range(plan.epochs):
        loader.set_epoch(epoch)
        if plan.cuda:
            torch.cuda.reset_peak_memory_stats(plan.device)
        start = time.perf_counter()
        batches = iter(loader)
        batch = next(batches)
        sync(plan.device)
        first = time.perf_counter() - start
        count = 1 + sum(1 for _ in batches)
        del batch, batches
        sync(plan.device)
        gc.collect()
        row = {
            "epoch": epoch + 1,
            "batches": count,
            "first_batch_s": first,
            "epoch_s": time.perf_counter() - start,
            "threads": thread_count(),
            "rss_mib": rss_mib(),
        }
        if plan.cuda:
            free, total = torch.cuda.mem_get_info(plan.device)
            row.update(
                cuda_allocated_mib=torch.cuda.memory_allocated(plan.device) / 2**20,
                cuda_peak_mib=torch.cuda.max_memory_allocated(plan.device) / 2**20,
                device_used_mib=(total - free) / 2**20,
            )
        rows.append(row)
    base, last = rows[min(1, len(rows) - 1)], rows[-1]
    problems = []
    if last["threads"] > base["threads"]:
        problems.append(f"threads {base['threads']} -> {last['threads']}")
    if last["rss_mib"] - base["rss_mib"] >= RSS_GROWTH_MIB:
        problems.append(f"RSS {base['rss_mib']:.0f} -> {last['rss_mib']:.0f} MiB")
    if plan.cuda:
        if last["cuda_allocated_mib"] > base["cuda_allocated_mib"]:
            problems.append(
                f"torch CUDA allocated {base['cuda_allocated_mib']:.1f} -> "
                f"{last['cuda_allocated_mib']:.1f} MiB"
            )
        if last["device_used_mib"] - base["device_used_mib"] >= DEVICE_MEMORY_GROWTH_MIB:
            problems.append(
                f"GPU memory in use {base['device_used_mib']:.0f} -> "
                f"{last['device_used_mib']:.0f} MiB"
            )
    columns = ["epoch", "batches", "first_batch_s", "epoch_s", "threads", "rss_mib"]
    if plan.cuda:
        columns += ["cuda_allocated_mib", "cuda_peak_mib", "device_used_mib"]
    body = [
        f"batch {plan.small_batch}, {plan.image_size} px, augmentation on; first_batch_s is the "
        "time from iter() to the first batch (epoch 1 builds the pipeline)."
        + ("" if plan.cuda else " GPU memory: not measured (no CUDA)."),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *(
            "| " + " | ".join(_cell(r[c]) for c in columns) + " |"
            for r in rows  # one line per epoch
        ),
    ]
    summary = (
        f"first batch {rows[0]['first_batch_s']:.2f} s (epoch 1), "
        f"{statistics.median(r['first_batch_s'] for r in rows[1:] or rows):.2f} s after; "
        f"threads {base['threads']} -> {last['threads']}, RSS {base['rss_mib']:.0f} -> "
        f"{last['rss_mib']:.0f} MiB"
        + (
            f", GPU in use {base['device_used_mib']:.0f} -> {last['device_used_mib']:.0f} MiB"
            if plan.cuda
            else ""
        )
        + (f"; growth: {'; '.join(problems)}" if problems else "")
    )
    return Check(
        "epochs",
        title,
        FAILED if problems else PASSED,
        summary,
        criterion,
        {"rows": rows, "problems": problems},
        body,
    )


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
