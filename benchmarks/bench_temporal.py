"""Seconds per train-temporal epoch over a synthetic feature folder of Aff-Wild2's size.

    python benchmarks/bench_temporal.py                                   # 2.8M frames, gru, CPU
    python benchmarks/bench_temporal.py --frames 280k --models gru,tcn,transformer --repeats 3

Synthesizes a feature folder (``--dir``, kept with ``--keep``) of ``--frames`` rows of 512-d
float16 features (2.8M rows: ~2.9 GB; refused without that much free disk plus 1 GB) in
``--videos`` videos of Aff-Wild2-like lengths (log-normal, mean ~5,000 frames, ~3 % of frames
without an image), every task labelled. Then, per model and device (the CPU, and CUDA when
present), builds the run as ``affectfast train-temporal`` does (defaults: window 256, stride 128,
8 windows a batch;
``--batch-size`` changes it) and times ``--repeats`` whole training epochs (validation not counted):
prints the median seconds per epoch, the split's frames per second of epoch and the frames the
model steps through per second (windows overlap, so each frame counts about window / stride
times there), and writes the table as CSV (``--csv``).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# As the CLI does (cli.use_passive_openmp): idle OpenMP threads sleep instead of spinning on a
# shared machine. libgomp reads it when torch loads, so before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from affectfast.config import TemporalConfig  # noqa: E402
from affectfast.features import FEATURE_DTYPE, VideoSpan, write_manifest, write_split  # noqa: E402
from affectfast.sequence import count_parameters  # noqa: E402
from affectfast.tasks import NUM_AU, NUM_EXPR, TASKS  # noqa: E402
from affectfast.train_temporal import build_temporal_run, train_one_epoch  # noqa: E402

DIM = 512
SIZE_SUFFIXES = {"k": 1_000, "m": 1_000_000}
CHUNK = 1 << 17  # rows written at a time
MISSING = 0.03  # share of frames without an image


def parse_frames(text: str) -> int:
    """ "2.8M" -> 2800000, "280k" -> 280000."""
    token = text.strip().lower().replace("_", "")
    factor = SIZE_SUFFIXES.get(token[-1:], 1)
    try:
        return round(float(token[:-1] if factor > 1 else token) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a frame count: {text!r}") from None


def video_rows(frames: int, videos: int, rng: np.random.Generator) -> np.ndarray:
    """Rows per video summing to ``frames``: log-normal lengths like Aff-Wild2's (a few hundred to
    tens of thousands of frames)."""
    lengths = rng.lognormal(mean=0.0, sigma=0.9, size=videos)
    rows = np.maximum(1, np.floor(lengths / lengths.sum() * frames)).astype(np.int64)
    rows[np.argmax(rows)] += frames - rows.sum()
    return rows


def synthesize(folder: Path, frames: int, videos: int, seed: int) -> None:
    """Write a train-only feature folder of ``frames`` rows (random features and labels)."""
    rng = np.random.default_rng(seed)
    counts = video_rows(frames, videos, rng)
    out = folder / "train"
    out.mkdir(parents=True, exist_ok=True)
    features = np.lib.format.open_memmap(
        out / "features.npy", mode="w+", dtype=FEATURE_DTYPE, shape=(frames, DIM)
    )
    for first in range(0, frames, CHUNK):
        part = rng.standard_normal((min(CHUNK, frames - first), DIM), dtype=np.float32)
        features[first : first + len(part)] = part
    spans, frame_numbers, first = [], [], 0
    for v, rows in enumerate(counts.tolist()):
        length = int(np.ceil(rows / (1 - MISSING)))
        chosen = np.sort(rng.choice(length, size=rows, replace=False)) + 1
        frame_numbers.append(chosen)
        spans.append(VideoSpan(f"video{v:03d}", first, rows, length))
        first += rows
    labels = {
        "va": rng.uniform(-1, 1, (frames, 2)).astype(np.float32),
        "expr": rng.integers(0, NUM_EXPR, frames),
        "au": (rng.random((frames, NUM_AU)) < 0.2).astype(np.float32),
    }
    masks = {t: np.ones(frames, bool) for t in TASKS}
    write_split(folder, "train", features, np.concatenate(frame_numbers), spans, labels, masks)
    write_manifest(
        folder,
        {
            "feature_dim": DIM,
            "checkpoint": {"path": "synthetic", "sha256": "0" * 64},
            "pack": {"path": "synthetic", "sha256": "0" * 64},
            "splits": {"train": {"rows": frames, "labelled": list(TASKS)}},
        },
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=parse_frames, default=2_800_000, help="e.g. 280k, 2.8M")
    parser.add_argument("--videos", type=int, default=564)
    parser.add_argument("--models", default="gru", help="comma-separated: gru,tcn,transformer")
    parser.add_argument("--devices", default="auto", help="auto (cpu, and cuda if present) | cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed epochs per model (median)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows [default: config]")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the features")
    parser.add_argument("--keep", action="store_true", help="keep the feature folder")
    parser.add_argument("--csv", type=Path, default=Path("runs/bench_temporal.csv"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_temporal_"))
    root.mkdir(parents=True, exist_ok=True)
    needed = args.frames * DIM * 2 + (1 << 30)
    free = shutil.disk_usage(root).free
    if free < needed:
        print(
            f"error: {root}: {free / 1e9:.1f} GB free, the features need {needed / 1e9:.1f} GB",
            file=sys.stderr,
        )
        return 2
    folder = root / "features"
    try:
        if not (folder / "features.json").exists():
            start = time.perf_counter()
            synthesize(folder, args.frames, args.videos, args.seed)
            print(f"synthesized {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        devices = devices if args.devices == "auto" else args.devices.split(",")
        rows = []
        for model in args.models.split(","):
            for device in devices:
                rows.append(time_model(folder, root, model, device, args))
                print_table(rows)
                write_csv(rows, args.csv)
    finally:  # what this run wrote; a --dir given stays (it may hold other files)
        if not args.keep:
            shutil.rmtree(root if args.dir is None else folder, ignore_errors=True)
    return 0


def time_model(folder: Path, root: Path, model: str, device: str, args) -> dict:
    """Median seconds and frames/s of ``args.repeats`` training epochs of ``model`` on ``device``."""
    extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
    config = TemporalConfig(
        features=folder, out=root / "run", model=model, device=device, seed=args.seed, **extra
    )
    start = time.perf_counter()
    run = build_temporal_run(config, torch.device(device))
    build = time.perf_counter() - start
    seconds, rates = [], []
    for epoch in range(args.repeats):
        stats = train_one_epoch(run, epoch, f"{model} {device} epoch {epoch + 1}")
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(stats["epoch_seconds"])
        rates.append(stats["images_per_s"])
    return {
        "model": model,
        "device": device,
        "params": count_parameters(run.model),
        "frames": args.frames,
        "windows": len(run.train.windows),
        "batch_size": config.batch_size,
        "build_s": round(build, 2),
        "epoch_s": round(statistics.median(seconds), 2),
        # The split's frames per second of epoch; windows overlap (window / stride = 2 by
        # default), so the model sees more: window_frames_per_s (metrics.jsonl's images_per_s).
        "frames_per_s": round(args.frames / statistics.median(seconds)),
        "window_frames_per_s": round(statistics.median(rates)),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
    }


def print_table(rows: list[dict]) -> None:
    header = list(rows[0])
    print("\t".join(header))
    for row in rows[-1:]:
        print("\t".join(str(row[k]) for k in header), flush=True)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
