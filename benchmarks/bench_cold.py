"""What reading the shards costs from a cold page cache: dali-cpu decode-only images/s, cold vs warm.

    .venv/bin/python benchmarks/bench_cold.py SHARDS [--batches 200] [--threads 2]

For each of ``--repeats`` rounds: drop the pack's tars from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)`` per tar: no reboot, no root needed), time ``--batches``
batches of the decode-only DALI pipeline (reader + CPU decoder, the train split, all tasks: every
component is read), then time the same batches again warm. Reports median images/s of each, the
bytes the process read from storage per sample (``/proc/self/io`` ``read_bytes``), the tar bytes
per sample of the pack and its JPEG bytes per sample (from the manifest): the shard layout's
overhead over the JPEGs is what a cold epoch pays in I/O.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from affectfast.loaders import build_loader
from affectfast.shards import split_shards
from affectfast.tasks import TASKS


def drop_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages (dirty pages are written first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes() -> int:
    """Bytes this process has caused to be fetched from storage so far."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["read_bytes"])


def timed(pipe, batches: int, batch_size: int) -> tuple[float, int]:
    """(images/s, bytes read from storage) over ``batches`` runs of the pipeline."""
    before, start = read_bytes(), time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * batch_size / (time.perf_counter() - start), read_bytes() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    shards = split_shards(args.shards, "train")
    samples = sum(s.samples for s in shards)
    tar_per_sample = sum(s.bytes for s in shards) / samples
    jpeg_per_sample = sum(s.jpeg_bytes for s in shards) / samples
    loader = build_loader(
        "dali-cpu", args.shards, "train", TASKS, args.batch_size, num_threads=args.threads
    )
    cold, warm, cold_read = [], [], []
    for _ in range(args.repeats):
        drop_cache([s.tar for s in shards])
        pipe = loader.pipeline(decode_only=True)
        rate, nbytes = timed(pipe, args.batches, args.batch_size)
        cold.append(rate)
        cold_read.append(nbytes / (args.batches * args.batch_size))
        pipe = loader.pipeline(decode_only=True)  # the same batches again, now cached
        warm.append(timed(pipe, args.batches, args.batch_size)[0])
    print(
        f"pack: {samples} train samples, {tar_per_sample:.0f} B of tar and "
        f"{jpeg_per_sample:.0f} B of JPEG per sample ({tar_per_sample / jpeg_per_sample:.2f}x)"
    )
    print(
        f"decode-only, cold cache: {statistics.median(cold):.0f} images/s, "
        f"{statistics.median(cold_read):.0f} B read from storage per sample"
    )
    print(
        f"decode-only, warm cache: {statistics.median(warm):.0f} images/s "
        f"(cold/warm {statistics.median(cold) / statistics.median(warm):.2f}); "
        f"medians of {args.repeats}, {args.batches} batches of {args.batch_size}, "
        f"{args.threads} threads"
    )


if __name__ == "__main__":
    main()
