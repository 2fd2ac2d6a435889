"""``affectfast extract`` images/s beside the loader's decode-only ceiling, in one run.

    python benchmarks/bench_extract.py                 # synthesizes + packs ~3,000 frames first
    python benchmarks/bench_extract.py --shards shards/demo --checkpoint runs/mtl/best.pt --loader dali-gpu

Two measurements over the train split, each the median of ``--repeats`` runs:
- ``extract``: the whole of ``extract_features`` (load the checkpoint, the pass, the merge, the
  folder written and renamed into place) into a fresh folder, rows / wall seconds;
- ``decode-only``: DALI's reader + decoder alone with the loader extract builds (same kind,
  threads and batch size: ``DaliLoader.pipeline(decode_only=True)``, as bench loaders measures
  it), as many images as the split has: the most any extract on this machine could reach.
``ratio = extract / decode-only`` (1.0: the loader is the limit; far below: the model is). Without
``--checkpoint`` the model is a freshly initialized one saved as a checkpoint: the same ResNet-18
trunk, so the same arithmetic. Prints a table and writes it as CSV beside ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from affectfast.config import ExtractConfig, TrainConfig
from affectfast.dist import DistInfo
from affectfast.extract import extract
from affectfast.model import AffectNet
from affectfast.pack import PackConfig, pack
from affectfast.rundir import CHECKPOINT_FORMAT, load_checkpoint, save_atomic
from affectfast.synth import SynthConfig, synthesize
from affectfast.tasks import TASKS
from affectfast.train import build_eval_loader, loader_threads, resolve_device, set_torch_threads


def make_checkpoint(path: Path, shards: Path, image_size: int) -> Path:
    """A valid frame checkpoint with untrained weights (extract's cost does not depend on them)."""
    config = TrainConfig(shards=shards, out=path.parent, image_size=image_size, amp="off")
    model = AffectNet(config.tasks)
    save_atomic(
        {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "model": model.state_dict()},
        path,
    )
    return path


def time_extract(checkpoint: Path, shards: Path, tmp: Path, args, repeat: int) -> float:
    out = tmp / f"features-{repeat}"
    config = ExtractConfig(
        checkpoint,
        shards,
        out,
        splits=("train",),
        loader=args.loader,
        batch_size=args.batch_size,
        num_threads=args.num_threads,
    )
    start = time.perf_counter()
    result = extract(config)
    seconds = time.perf_counter() - start
    return result.rows["train"] / seconds


def time_decode_only(checkpoint: Path, shards: Path, args) -> tuple[float, int]:
    """(images/s of the decode-only pipeline of extract's loader over one pass, loader threads)."""
    saved = TrainConfig.from_dict(load_checkpoint(checkpoint)["config"])
    run = dataclasses.replace(
        saved, shards=shards, loader=args.loader, num_threads=args.num_threads, tasks=TASKS
    )
    run, use_cuda = resolve_device(run)
    info = DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    loader = build_eval_loader(run, shards, "train", info, args.batch_size)
    pipe = loader.pipeline(decode_only=True)
    pipe.run()  # warm-up: the first batch builds the decoder's buffers
    images, start = 0, time.perf_counter()
    while images < len(loader) * args.batch_size:
        (batch,) = pipe.run()
        if use_cuda:
            torch.cuda.synchronize()
        images += len(batch)
    return images / (time.perf_counter() - start), loader_threads(run, info)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="a pack; default: synthesize and pack one")
    parser.add_argument("--checkpoint", type=Path, help="default: an untrained frame checkpoint")
    parser.add_argument("--videos", type=int, default=12, help="synthetic videos (no --shards)")
    parser.add_argument("--frames", type=int, default=250, help="synthetic frames per video")
    parser.add_argument("--image-size", type=int, default=112, help="model input (no --checkpoint)")
    parser.add_argument("--loader", default="dali-cpu", choices=("dali-cpu", "dali-gpu"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-threads", default="auto", help='loader threads: "auto" or N')
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, default=Path("runs/bench_extract.csv"))
    args = parser.parse_args(argv)
    if args.num_threads != "auto":
        args.num_threads = int(args.num_threads)
    set_torch_threads(DistInfo())  # as extract sets them, for both measurements

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        shards = args.shards
        if shards is None:
            tree = synthesize(
                SynthConfig(
                    out=tmp / "tree", videos=args.videos, frames=args.frames, image_size=112
                )
            )
            shards = tmp / "shards"
            pack(PackConfig(root=tree, out=shards, shard_size=500, seed=0), progress=False)
        checkpoint = args.checkpoint or make_checkpoint(tmp / "best.pt", shards, args.image_size)
        extract_rates, decode_rates = [], []
        for repeat in range(args.repeats + 1):  # the first of each is a warm-up
            extract_rate = time_extract(checkpoint, shards, tmp, args, repeat)
            decode_rate, threads = time_decode_only(checkpoint, shards, args)
            if repeat:
                extract_rates.append(extract_rate)
                decode_rates.append(decode_rate)
            print(
                f"run {repeat}: extract {extract_rate:.1f}, decode-only {decode_rate:.1f} "
                "images/s" + (" (warm-up)" if not repeat else ""),
                file=sys.stderr,
            )
    rows = [
        {
            "measurement": name,
            "images_per_s": statistics.median(rates),
            "runs": " ".join(f"{r:.1f}" for r in rates),
            "loader": args.loader,
            "loader_threads": threads,
            "torch_threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
        }
        for name, rates in (("extract", extract_rates), ("decode-only", decode_rates))
    ]
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'measurement':<14}{'images/s (median)':>20}{'runs':>30}")
    for row in rows:
        print(f"{row['measurement']:<14}{row['images_per_s']:>20.1f}{row['runs']:>30}")
    print(
        f"extract / decode-only: {rows[0]['images_per_s'] / rows[1]['images_per_s']:.3f}   "
        f"[{args.loader}, loader threads {threads}, torch threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}]  csv: {args.csv}"
    )


if __name__ == "__main__":
    main()
