"""Training throughput with the real loader vs the same batches already in memory, in one run.

    python benchmarks/bench_train.py                       # synthesizes + packs a small tree first
    python benchmarks/bench_train.py --shards shards/demo --loader dali-gpu --batch-size 256 --image-size 112

Three measurements, each the median of ``--repeats`` timed runs of ``--steps`` batches after
``--warmup`` untimed ones (the device is synchronized before every clock read):
- ``loader``: the loader alone (iterate, touch nothing): the most it can feed;
- ``train+loader``: the training step fed by the loader, as `affectfast train` runs;
- ``train+memory``: the same step over ``--steps`` batches taken from the loader once and kept in
  memory (on the device): the step's own speed.
``overhead = train+memory / train+loader`` (1.0 = the loader costs nothing; 2.0 = training waits
on data half the time). Prints a table and writes it as CSV beside ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from affectfast.batch import Batch
from affectfast.config import TrainConfig
from affectfast.dist import DistInfo
from affectfast.pack import PackConfig, pack
from affectfast.synth import SynthConfig, synthesize
from affectfast.train import build_run, resolve_device


def endless(loader):
    """Batches from epoch after epoch (set_epoch each time), for timing runs longer than an epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device, warmup: int, steps: int, repeats: int, batch_size: int) -> list[float]:
    """images/s of ``repeats`` timed calls run(steps) after one run(warmup)."""
    run(warmup)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run(steps)
        sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", type=Path, help="pack output; default: synthesize and pack a small tree"
    )
    parser.add_argument("--loader", default="dali-gpu", help="falls back to dali-cpu without CUDA")
    parser.add_argument("--tasks", default="va,expr,au")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=2, help="loader threads")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="intra-op threads for the CPU step"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model, as train --compile does"
    )
    parser.add_argument("--csv", type=Path, default=Path("runs/bench_train.csv"))
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            tree = synthesize(
                SynthConfig(
                    out=Path(tmp) / "tree", videos=12, frames=100, seed=0, image_size=64, workers=1
                )
            )
            shards = Path(tmp) / "shards"
            pack(PackConfig(root=tree, out=shards, workers=1, shard_size=500, seed=0))
        config, _ = resolve_device(
            TrainConfig(
                shards=shards,
                out=Path(tmp) / "run",
                tasks=args.tasks,
                loader=args.loader,
                batch_size=args.batch_size,
                image_size=args.image_size,
                amp=args.amp,
                num_threads=args.num_threads,
                torch_compile=args.compile,
            )
        )
        rows = run_benchmark(config, args)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'measurement':<16}{'images/s (median)':>20}{'runs':>30}")
    for row in rows:
        print(f"{row['measurement']:<16}{row['images_per_s']:>20.1f}{row['runs']:>30}")
    ratio = rows[2]["images_per_s"] / rows[1]["images_per_s"]
    print(
        f"loader overhead (train+memory / train+loader): {ratio:.2f}x   "
        f"[{config.loader}, amp {config.amp}, batch {config.batch_size}, {config.image_size}px, "
        f"{'compiled, ' if config.torch_compile else ''}"
        f"torch threads {torch.get_num_threads()}]  csv: {args.csv}"
    )


def run_benchmark(config: TrainConfig, args) -> list[dict]:
    """The three measurements as CSV rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The run exactly as `affectfast train` builds it (model, loader, optimizer, precision, step).
    training = build_run(config, DistInfo(device=device))

    def step(batch):
        return training.step(training.ddp, batch)  # compiled with --compile, as train runs it

    loader = training.train_loader
    stream = endless(loader)
    # The same batches, decoded once; cloned so they stay valid should a loader reuse its buffers.
    in_memory = [
        Batch(
            b.images.clone(),
            {t: v.clone() for t, v in b.labels.items()},
            {t: v.clone() for t, v in b.masks.items()},
        )
        for b in islice(stream, args.steps)
    ]

    def from_loader(n):
        for batch in islice(stream, n):
            step(batch)

    def loader_only(n):
        for batch in islice(stream, n):
            batch.images.sum()  # touch the data so lazy copies complete

    def from_memory(n):
        for batch in islice(iter(in_memory * (n // len(in_memory) + 1)), n):
            step(batch)

    rows = []
    for name, run in (
        ("loader", loader_only),
        ("train+loader", from_loader),
        ("train+memory", from_memory),
    ):
        rates = timed(run, device, args.warmup, args.steps, args.repeats, config.batch_size)
        rows.append(
            {
                "measurement": name,
                "images_per_s": statistics.median(rates),
                "runs": " ".join(f"{r:.1f}" for r in rates),
                "loader": config.loader,
                "amp": config.amp,
                "batch_size": config.batch_size,
                "image_size": config.image_size,
                "device": device.type,
                "torch_threads": torch.get_num_threads(),
            }
        )
        print(f"{name}: {statistics.median(rates):.1f} images/s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
