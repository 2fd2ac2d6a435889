"""Where dali-cpu's time goes: images/s of the bare DALI pipeline (``pipe.run()``) stage by stage.

Stages, each measured in the same run on the same shards: decode only; decode + normalize (no
geometry); decode + flip + normalize; the full training graph (one warp_affine for scale and
rotation, flip, normalize). Medians over timed batches after a warm-up.

    .venv/bin/python benchmarks/bench_dali_stages.py runs/bshards --batch-size 256 --image-size 112
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from affectfast.config import AugmentSpec
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS


def images_per_s(pipe, batch_size: int, batches: int, warmup: int = 3) -> float:
    """Median images/s of ``pipe.run()`` over ``batches`` timed batches."""
    for _ in range(warmup):
        pipe.run()
    rates = []
    for _ in range(batches):
        start = time.perf_counter()
        pipe.run()
        rates.append(batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--interpolation", choices=("nearest", "linear"), default="nearest")
    args = parser.parse_args()

    stages = {
        "decode only": (None, True),
        "decode + normalize": (None, False),
        "decode + flip + normalize": (AugmentSpec(degrees=0), False),
        "full: one warp (scale+rotation) + flip + normalize": (
            AugmentSpec(interpolation=args.interpolation),
            False,
        ),
    }
    print(f"{'stage':52s} images/s   x decode")
    decode = None
    for name, (augment, decode_only) in stages.items():
        loader = build_loader(
            "dali-cpu",
            args.shards,
            "train",
            TASKS,
            args.batch_size,
            image_size=args.image_size,
            augment=augment,
            num_threads=args.threads,
        )
        pipe = loader.pipeline(decode_only=decode_only)
        rate = images_per_s(pipe, args.batch_size, args.batches)
        decode = decode or rate
        print(f"{name:52s} {rate:8.0f}   {rate / decode:.2f}")


if __name__ == "__main__":
    main()
