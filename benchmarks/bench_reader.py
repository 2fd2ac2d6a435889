"""Time and memory of the Aff-Wild2 reader (`read_tree`) on a generated tree, extrapolated to 2.8M.

The tree has all three tasks for every video, about 3% of frames without an image, -5/-1 ignore
markers, and *empty* .jpg files: the reader lists images but never opens them, so their content does
not matter here. Run:

    .venv/bin/python benchmarks/bench_reader.py --videos 40 --frames 2500 --runs 3

Prints a table and writes it as CSV (``--csv``). Peak memory is the tracemalloc peak during one
``read_tree`` (numpy allocations included) and the process's max RSS.
"""

from __future__ import annotations

import argparse
import csv
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from affectfast.affwild2 import find_annotation_dirs, read_tree
from affectfast.tasks import CHALLENGE_DIRS, HEADERS

REAL_FRAMES = 2_800_000  # cropped-aligned frames in the Aff-Wild2 release


def write_tree(root: Path, videos: int, frames: int, seed: int) -> int:
    """Write annotation files for every task and empty images; return the number of images."""
    rng = np.random.default_rng(seed)
    images = 0
    for v in range(videos):
        name = f"{v:03d}-bench-1280x720" + ("_left" if v % 5 == 0 else "")
        split = "Train_Set" if v % 4 else "Validation_Set"
        va = np.round(rng.uniform(-1, 1, (frames, 2)), 6)
        va[rng.random(frames) < 0.05, 0] = -5
        expr = rng.integers(-1, 8, frames)
        au = rng.integers(0, 2, (frames, 12))
        au[rng.random(frames) < 0.05] = -1
        rows = {
            "va": [f"{a},{b}" for a, b in va],
            "expr": [str(e) for e in expr],
            "au": [",".join(map(str, r)) for r in au],
        }
        for task, lines in rows.items():
            path = root / "annotations" / CHALLENGE_DIRS[task][0] / split / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join([",".join(HEADERS[task]), *lines]) + "\n")
        folder = root / "cropped_aligned" / name
        folder.mkdir(parents=True)
        for frame in np.flatnonzero(rng.random(frames) >= 0.03) + 1:
            (folder / f"{frame:05d}.jpg").touch()
            images += 1
    return images


def measure(root: Path) -> tuple[float, int, int, int]:
    """One timed read_tree: seconds, kept frames, retained array bytes, tracemalloc peak bytes."""
    dirs = find_annotation_dirs(root)
    tracemalloc.start()
    start = time.perf_counter()
    videos = read_tree(dirs)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept = sum(len(v) for v in videos)
    retained = sum(a.nbytes for v in videos for a in (v.frames, v.va, v.expr, v.au))
    return seconds, kept, retained, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--frames", type=int, default=2500, help="annotation lines per video")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=Path("runs/bench_reader.csv"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_tree(root, args.videos, args.frames, args.seed)
        read_tree(find_annotation_dirs(root))  # warm-up: page cache and imports
        # tracemalloc slows allocation-heavy code, so time separately from the memory run.
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            videos = read_tree(find_annotation_dirs(root))
            times.append(time.perf_counter() - start)
        kept = sum(len(v) for v in videos)
        del videos
        _, _, retained, peak = measure(root)
    seconds = statistics.median(times)
    lines = args.videos * args.frames * 3
    scale = REAL_FRAMES / kept
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    rows = [
        ("annotated frames (lines per task)", args.videos * args.frames),
        ("annotation lines, 3 tasks", lines),
        ("images", images),
        ("kept frames", kept),
        ("read_tree median seconds", round(seconds, 3)),
        ("kept frames per second", round(kept / seconds)),
        ("annotation lines per second", round(lines / seconds)),
        ("retained label arrays MB", round(retained / 1e6, 2)),
        ("tracemalloc peak MB", round(peak / 1e6, 2)),
        ("process max RSS MB", round(rss / 1e6, 1)),
        ("extrapolated seconds at 2.8M frames", round(seconds * scale, 1)),
        ("extrapolated retained MB at 2.8M frames", round(retained * scale / 1e6, 1)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        csv.writer(f).writerows([("metric", "value"), *rows])
    print(f"wrote {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
