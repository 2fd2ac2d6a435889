"""``affectfast bench loaders``: images/s of each loader kind on the same pack, in the same run.

Each loader runs a training epoch loop (train split, shuffle, full augmentation, drop_last) for
``seconds`` after ``warmup`` batches. Batch times are grouped in windows of a few batches (DataLoader
workers deliver in bursts) and the median window's throughput is reported, so one slow window
(a DALI pipeline rebuilt at an epoch boundary, DataLoader workers restarting) does not skew it.
The decode-only ceiling is DALI's CPU decoder alone (reader + decode, no augmentation, no copy out)
measured the same way in the same run: how fast any CPU loader could go on this machine. With
``dali-gpu`` a second ceiling, nvJPEG alone (``decode-only-gpu``), rates the GPU loader.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from affectfast.config import AugmentSpec
from affectfast.console import say
from affectfast.constants import LOADER_KINDS
from affectfast.loaders import Loader, build_loader
from affectfast.shards import split_shards
from affectfast.tasks import TASKS

DECODE_ONLY = "decode-only"
DECODE_ONLY_GPU = "decode-only-gpu"
WINDOW = 4  # batches per timing window


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark; see the module docstring."""

    shards: Path
    loaders: tuple[str, ...] = ("dali-cpu", "wds", "files")
    tree: Path | None = None  # the raw tree, for "files"
    batch_size: int = 256
    image_size: int = 112
    seconds: float = 10.0  # timed seconds per loader (after warm-up)
    warmup: int = 3  # batches before timing
    augment: AugmentSpec | None = field(default_factory=AugmentSpec)
    tasks: tuple[str, ...] = TASKS
    num_threads: int = 2  # DALI threads / DataLoader workers
    device: str = "cpu"  # for dali-gpu: "cuda"
    hw_decoder_load: float = 0.65  # dali-gpu: share of JPEGs for the hardware decoder

    def __post_init__(self):
        object.__setattr__(self, "shards", Path(self.shards))
        unknown = set(self.loaders) - set(LOADER_KINDS)
        if unknown or not self.loaders:
            raise ValueError(
                f"loaders must be a non-empty subset of {LOADER_KINDS}, got {self.loaders}"
            )
        if "files" in self.loaders and self.tree is None:
            raise ValueError("the files loader reads the raw tree: pass tree (--tree ROOT)")
        if self.batch_size < 1 or self.seconds <= 0 or self.warmup < 0:
            raise ValueError("batch_size >= 1, seconds > 0 and warmup >= 0 required")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")


@dataclass(frozen=True)
class BenchResult:
    """One row of the table."""

    loader: str
    images_per_s: float
    mb_per_s: float  # JPEG bytes read per second (MB = 1e6 bytes)
    vs_files: float | None  # images/s ratio to the files loader (None without it)
    vs_decode: float  # images/s ratio to the decode-only ceiling
    batches: int  # timed batches


def bench_loaders(config: BenchConfig, progress: bool = True) -> list[BenchResult]:
    """Time each loader and the decode-only ceilings; returns rows, the ceilings last.

    The CPU ceiling (DALI's CPU decoder alone) rates every CPU kind; with ``dali-gpu`` a GPU
    ceiling (nvJPEG alone, same reader and threads) is measured too and rates ``dali-gpu``.
    """
    rates = {}
    for kind in config.loaders:
        if progress:
            say(f"timing {kind} ...")
        rates[kind] = _time(_batches_forever(_loader(config, kind)), config)
    ceilings = {DECODE_ONLY: "dali-cpu"}
    if "dali-gpu" in config.loaders:
        ceilings[DECODE_ONLY_GPU] = "dali-gpu"
    for name, kind in ceilings.items():
        if progress:
            say(f"timing the {name} ceiling ...")
        rates[name] = _time(_decoded_forever(_loader(config, kind)), config)
    # Mean JPEG size of the split (every kind reads the same frames, as tar members or files).
    shards = split_shards(config.shards, "train")
    jpeg_bytes = sum(s.jpeg_bytes for s in shards) / sum(s.samples for s in shards)
    files = rates.get("files", (None,))[0]

    def ceiling(kind: str) -> float:
        gpu = kind in ("dali-gpu", DECODE_ONLY_GPU)
        return rates[DECODE_ONLY_GPU if gpu else DECODE_ONLY][0]

    return [
        BenchResult(
            kind,
            rate,
            rate * jpeg_bytes / 1e6,
            rate / files if files else None,
            rate / ceiling(kind),
            count,
        )
        for kind, (rate, count) in rates.items()
    ]


def _loader(config: BenchConfig, kind: str) -> Loader:
    device = config.device if kind == "dali-gpu" else "cpu"
    return build_loader(
        kind,
        config.shards,
        "train",
        config.tasks,
        config.batch_size,
        image_size=config.image_size,
        augment=config.augment,
        device=device,
        num_threads=config.num_threads,
        tree=config.tree,
        hw_decoder_load=config.hw_decoder_load,
    )


def _batches_forever(loader):
    """Batch sizes of consecutive epochs (each epoch reshuffled), forever."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            if batch.images.is_cuda:
                torch.cuda.synchronize(batch.images.device)
            yield len(batch)
        epoch += 1


def _decoded_forever(loader):
    """Batch sizes of DALI decoding alone (same reader, threads and batch size as the loader)."""
    pipe = loader.pipeline(decode_only=True)
    gpu = loader.config.kind == "dali-gpu"
    while True:
        (images,) = pipe.run()
        if gpu:
            torch.cuda.synchronize()  # DALI decodes on its own stream: wait for the pixels
        yield len(images)


def _time(batches, config: BenchConfig) -> tuple[float, int]:
    """(median images/s over windows of WINDOW batches, timed batch count)."""
    for _ in range(config.warmup):
        next(batches)
    rates, count = [], 0
    start = time.perf_counter()
    while True:
        window_start, images = time.perf_counter(), 0
        for _ in range(WINDOW):
            images += next(batches)
        now = time.perf_counter()
        rates.append(images / (now - window_start))
        count += WINDOW
        if now - start >= config.seconds:
            return statistics.median(rates), count


def format_table(results: list[BenchResult]) -> str:
    """The printed table."""
    lines = [
        f"{'loader':<12} {'images/s':>10} {'MB/s':>8} {'x files':>8} {'x decode':>9} {'batches':>8}"
    ]
    for r in results:
        vs_files = f"{r.vs_files:.2f}" if r.vs_files is not None else "-"
        lines.append(
            f"{r.loader:<12} {r.images_per_s:>10.0f} {r.mb_per_s:>8.1f} {vs_files:>8} "
            f"{r.vs_decode:>9.2f} {r.batches:>8}"
        )
    return "\n".join(lines)


def write_csv(results: list[BenchResult], path: str | Path) -> None:
    """CSV with columns loader,images_per_s,mb_per_s,vs_files,vs_decode,batches."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["loader", "images_per_s", "mb_per_s", "vs_files", "vs_decode", "batches"])
        for r in results:
            writer.writerow(
                [
                    r.loader,
                    f"{r.images_per_s:.1f}",
                    f"{r.mb_per_s:.2f}",
                    "" if r.vs_files is None else f"{r.vs_files:.3f}",
                    f"{r.vs_decode:.3f}",
                    r.batches,
                ]
            )


def write_plot(results: list[BenchResult], path: str | Path, title: str = "") -> None:
    """A PNG bar chart of images/s per loader (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r.loader for r in results]
    values = [r.images_per_s for r in results]
    bars = ax.bar(names, values, color=["#999" if n == DECODE_ONLY else "#3a7" for n in names])
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in values])
    ax.set_ylabel("images/s (median)")
    ax.set_title(title or "loader throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
