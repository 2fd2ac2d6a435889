"""What the training shuffle costs a DALI loader: images/s, start-up and memory with the sample
buffer at its default (``loaders.base.SHUFFLE_BUFFER``) against a buffer of one sample, which reads
each tar in stored order as DALI's reader does without ``random_shuffle`` (only the tar order then
changes between epochs), and optionally against the loader of another checkout (``--baseline``,
e.g. a ``git worktree`` of the commit before a change).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_shuffle.py SHARDS
    PYTHONPATH=. .venv/bin/python benchmarks/bench_shuffle.py SHARDS --baseline /tmp/base --windows 40

Each configuration runs in a process of its own (train split, all tasks, full augmentation, as
``affectfast bench loaders``), and the processes take turns timing a window of batches, so all of
them see the same load on a shared machine. The table gives the median window's images/s, its
ratio to the first configuration's, the time from ``iter()`` to the first batch (DALI builds its
pipeline and fills the buffer) and the process's RSS at the first batch and after the last window.
Prints the table and writes it as CSV (``--csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WINDOW = 4  # batches per timing window, as affectfast.bench


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(args) -> None:
    """One configuration's process: build the loader, then time a window per line on stdin."""
    from affectfast.config import AugmentSpec
    from affectfast.loaders import build_loader
    from affectfast.tasks import TASKS

    options = {} if args.buffer is None else {"shuffle_buffer": args.buffer}
    common = dict(image_size=args.image_size, num_threads=args.num_threads)
    # The val loader first, so the modules DALI loads on first use are loaded before timing.
    warm = build_loader(args.kind, args.shards, "val", TASKS, args.batch_size, **common)
    began = time.perf_counter()
    loader = build_loader(
        args.kind,
        args.shards,
        "train",
        TASKS,
        args.batch_size,
        augment=AugmentSpec(),
        **common,
        **options,
    )

    def forever():
        while True:
            loader.set_epoch(loader.epoch)  # a DALI loader runs its epochs in order
            for batch in loader:
                yield len(batch)

    stream = forever()
    next(stream)
    reply = {"first_s": time.perf_counter() - began, "rss": rss_bytes()}
    for _ in range(args.warmup):
        next(stream)
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        if line.strip() != "window":
            break
        began, images = time.perf_counter(), 0
        for _ in range(WINDOW):
            images += next(stream)
        print(json.dumps({"rate": images / (time.perf_counter() - began)}), flush=True)
    print(json.dumps({"rss": rss_bytes()}), flush=True)
    stream.close()
    del warm


def spawn(args, checkout: Path, buffer: int | None) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), str(args.shards), "--serve"]
    command += ["--kind", args.kind, "--batch-size", str(args.batch_size)]
    command += ["--image-size", str(args.image_size), "--num-threads", str(args.num_threads)]
    command += ["--warmup", str(args.warmup)] + (
        [] if buffer is None else ["--buffer", str(buffer)]
    )
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def ask(process: subprocess.Popen, line: str | None = None) -> dict:
    if line is not None:
        process.stdin.write(line + "\n")
        process.stdin.flush()
    answer = process.stdout.readline()
    if not answer:
        raise RuntimeError(f"a benchmark process ended early (exit {process.wait()})")
    return json.loads(answer)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument(
        "--buffers", default=None, help="comma-separated [default: SHUFFLE_BUFFER,1]"
    )
    parser.add_argument("--baseline", type=Path, help="another checkout's loader, timed alike")
    parser.add_argument("--kind", default="dali-cpu", choices=("dali-cpu", "dali-gpu"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=20, help="timed windows per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing")
    parser.add_argument("--csv", type=Path, default=Path("runs/bench_shuffle.csv"))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--buffer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
        return 0

    from affectfast.loaders.base import SHUFFLE_BUFFER

    here = Path(__file__).resolve().parents[1]
    buffers = [int(b) for b in (args.buffers or f"{SHUFFLE_BUFFER},1").split(",")]
    configs = [(f"buffer {b}", here, b) for b in buffers]
    if args.baseline is not None:
        configs.append((f"baseline {args.baseline}", args.baseline.resolve(), None))
    runs = []
    for name, checkout, buffer in configs:  # started one after another: start-up timed alone
        process = spawn(args, checkout, buffer)
        runs.append({"name": name, "process": process, **ask(process), "rates": []})
    for _ in range(args.windows):
        for run in runs:
            run["rates"].append(ask(run["process"], "window")["rate"])
    for run in runs:
        run["rss_end"] = ask(run["process"], "quit")["rss"]
        run["process"].wait()

    base = statistics.median(runs[0]["rates"])
    rows = [
        {
            "configuration": run["name"],
            "images_per_s": round(statistics.median(run["rates"]), 1),
            "ratio": round(statistics.median(run["rates"]) / base, 3),
            "iter_to_first_batch_s": round(run["first_s"], 3),
            "rss_first_batch_mib": round(run["rss"] / 2**20),
            "rss_end_mib": round(run["rss_end"] / 2**20),
            "windows": len(run["rates"]),
        }
        for run in runs
    ]
    print(
        f"{args.kind}, {args.shards}, batch {args.batch_size}, {args.image_size} px, "
        f"{args.num_threads} threads, medians of {args.windows} windows of {WINDOW} batches"
    )
    for row in rows:
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
