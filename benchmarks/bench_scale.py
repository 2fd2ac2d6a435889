"""Scale benchmark: what pack, verify and the loaders cost at 28k, 280k and 2.8M
frames on one machine, each measured in a fresh process so its peak RSS is its own.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_scale.py --frames 28k --work /scratch/scale
    PYTHONPATH=. .venv/bin/python benchmarks/bench_scale.py --frames 28k,280k,2.8M --full-epoch

The tree is an Aff-Wild2-layout tree built cheaply: a pool of ``--pool`` synthetic frames drawn with
affectfast.synth (about 5.4 KB of JPEG each at 112 px, like the real crops), then
``cropped_aligned/<video>/<NNNNN>.jpg`` as hard links into that pool and the three challenges'
annotation files with random but valid labels. It has Aff-Wild2's shape, scaled with ``--frames``:
564 videos at 2.8M frames (the count scales with the square root of the size, the lengths with the
rest), lengths log-normal from a few hundred to about 20k frames, VA on almost every video, EXPR and
AU on about half each, Train/Validation 80/20 by video, ``_left``/``_right`` pairs, about 3% of
annotation lines without an image and 2% of labels ignored (-5 / -1). Hard links cost directory
entries, not disk: building 2.8M of them takes about a minute. The tree is kept in ``--work`` and
reused by later runs (``.complete`` records how it was made).

Per size, in this order (the medians of ``--repeats`` runs for pack and verify):
- ``python -m affectfast pack TREE --check header`` and ``--check full`` (``--pack-workers``), then
  ``python -m affectfast verify``: wall seconds, frames/s, peak RSS of the main process and peak
  PSS of its whole process tree (workers included);
- bytes on disk per frame: (tars + .idx) / images in the tree;
- per loader kind (``--loaders``; the train split, all tasks, augmentation on): construction time,
  time from ``iter()`` to the first batch, the epoch boundary (stop iterating an epoch, start the
  next, first batch: the per-epoch setup; taken ``--boundaries`` times after a few batches each,
  median; "teardown" is its part before the new ``iter()``), steady images/s (median of windows of
  4 batches over ``--seconds``), RSS after the imports, peak RSS of the main process, peak PSS of
  the process tree (DataLoader workers included), and memory per train sample: our index
  (tracemalloc around construction, in a process of its own) against the RSS growth over
  construction. The kind's val loader is built first in both processes, so modules imported on
  first use (DALI, torchvision) are not counted as index;
- with ``--full-epoch``: one whole epoch of the dali-cpu train loader (keys on, last batch kept):
  every train sample must come exactly once (the count equals the manifest's train samples); peak
  RSS, and its anonymous and file-backed parts at the first batch, at half the epoch and after the
  last batch (the epoch's pipeline then torn down).
  DALI's reader maps the tars: file-backed RSS grows by the shard bytes read (about 8 KB a sample)
  until the epoch's pipeline is destroyed, while anonymous memory levels off after a few batches.

Memory: every measurement runs in a fresh process, so ``ru_maxrss`` is that process's own peak.
Workers are not measured with ``RUSAGE_CHILDREN``: a process forked from a large one (``import
torch`` runs one, DataLoader forks its workers) inherits the parent's RSS high-water mark. Instead
this script samples the PSS of the child's process tree every ``SAMPLE_S`` seconds: pages shared
by several processes (libraries, copy-on-write pages of forked workers) count once in the sum.

Prints one table (a column per size and, with several sizes, the log-log slope from the smallest
to the largest: 1.0 grows linearly, 0 is a fixed cost), writes it as CSV (``--csv``) and draws every
cost against frames on log-log axes beside it (PNG).

What this does not measure: disk read bandwidth of the frames. Every image of the tree is one of
the pool's few thousand files, so pack and the files loader read JPEGs from the page cache; the
shards are real files and, at 2.8M frames (about 22 GB), larger than most page caches.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import affectfast
from affectfast.affwild2 import FRAMES_DIR
from affectfast.constants import LABELLED_SPLITS
from affectfast.synth import (
    VideoPlan,
    annotation_path,
    draw_frame,
    encode_jpeg,
    face_masks,
    video_style,
)
from affectfast.tasks import HEADERS, NUM_AU, NUM_EXPR, TASKS

AFFWILD2_FRAMES = 2_800_000
AFFWILD2_VIDEOS = 564
SIZE_SUFFIXES = {"k": 1_000, "m": 1_000_000}
MIN_FRAMES = 1_000  # room for 8 videos in both splits with every task
LOADER_CHOICES = ("dali-cpu", "wds", "files")
WINDOW = 4  # batches per timing window, as affectfast.bench

# Disk needed per frame (bytes): a shard sample is its JPEG plus one 512 B tar header per component
# and padding to 512 B per component, plus its .idx line; the tree costs directory entries and
# annotation lines only.
SHARD_BYTES_PER_FRAME = 8_400
TREE_BYTES_PER_FRAME = 200
POOL_JPEG_BYTES = 5_400  # what NOISE_STD gives at 112 px, quality 90 (measured: 6/255 -> 5.28 KB)
NOISE_STD = 6.5 / 255  # pixel noise of the pool frames: the real crops' JPEG size needs it
POOL_STYLES = 64  # frames drawn per synthetic "video" look in the pool
LINK_MAX = 60_000  # ext4 allows 65,000 hard links per file
SAMPLE_S = 0.25  # memory sampling period of child process trees, seconds

# The shape of the tree (docs/design.md §1; figures of the Aff-Wild2 release, rounded).
GAP_FRACTION = 0.03  # annotation lines whose frame has no image
IGNORE_FRACTION = 0.02  # labels marked -5 / -1
VAL_FRACTION = 0.2  # videos in Validation_Set
TASK_SHARE = {"va": 0.97, "expr": 0.5, "au": 0.5}  # videos annotated per task
LENGTH_RANGE = (300, 20_000)  # video lengths at full size, frames
LENGTH_SIGMA = 0.9  # log-normal spread of the lengths
PAIR_EVERY = 20  # one video in PAIR_EVERY is a _left/_right pair of subjects
MAX_LINES = 99_999  # five-digit frame numbers


@dataclass(frozen=True)
class ScaleConfig:
    """What to measure; see the module docstring."""

    sizes: tuple[int, ...]  # frames (images in the tree) per size, ascending
    work: Path  # scratch folder: pool, trees, shards, logs
    csv: Path
    plot: Path
    loaders: tuple[str, ...] = ("dali-cpu", "wds", "files")
    batch_size: int = 256
    image_size: int = 112
    seconds: float = 10.0  # timed seconds of steady iteration per loader
    warmup: int = 3  # batches before timing, and between epoch-boundary measurements
    boundaries: int = 3  # epoch boundaries timed per loader
    repeats: int = 1  # pack and verify runs per size (median)
    pack_workers: int = 2
    num_threads: int = 2  # DALI threads / DataLoader workers
    pool: int = 2_048  # distinct JPEGs the tree links to
    full_epoch: bool = False
    keep: bool = False  # keep each size's tree and shards (else removed once measured)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "work", Path(self.work))
        if not self.sizes or min(self.sizes) < MIN_FRAMES:
            raise ValueError(f"sizes must be >= {MIN_FRAMES} frames, got {self.sizes}")
        if not self.loaders or set(self.loaders) - set(LOADER_CHOICES):
            raise ValueError(f"loaders must be a subset of {LOADER_CHOICES}, got {self.loaders}")
        if min(self.batch_size, self.repeats, self.pack_workers, self.num_threads) < 1:
            raise ValueError("batch_size, repeats, pack_workers and num_threads must be >= 1")
        if self.seconds <= 0 or self.warmup < 0 or self.boundaries < 1:
            raise ValueError("seconds > 0, warmup >= 0 and boundaries >= 1 required")
        if self.pool < math.ceil(max(self.sizes) / LINK_MAX) or self.pool < 1:
            raise ValueError(
                f"pool must be >= {math.ceil(max(self.sizes) / LINK_MAX)} (link limit)"
            )


def parse_sizes(text: str) -> tuple[int, ...]:
    """ "28000,280k,2.8M" -> (28000, 280000, 2800000), sorted, duplicates dropped."""
    sizes = set()
    for token in text.lower().replace("_", "").split(","):
        token = token.strip()
        factor = SIZE_SUFFIXES.get(token[-1:], 1)
        number = token[:-1] if factor > 1 else token
        try:
            sizes.add(round(float(number) * factor))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a frame count: {token!r}") from None
    return tuple(sorted(sizes))


# --- the pool and the tree ------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoShape:
    """One subject's folder and annotation files in the scale tree."""

    name: str
    split: str
    tasks: tuple[str, ...]
    lines: int  # annotation lines (frame slots); about GAP_FRACTION of them have no image


def make_pool(folder: Path, count: int, seed: int) -> list[str]:
    """``count`` synthetic 112 px frames (affectfast.synth's drawing) as NNNNNN.jpg; names returned.

    Made once per (count, seed): ``folder/.complete`` marks a finished pool.
    """
    names = [f"{i:06d}.jpg" for i in range(count)]
    if (folder / ".complete").exists():
        return names
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng([seed, 0])
    size, amplitude = 112, np.float32(NOISE_STD * 12**0.5)  # uniform noise of std NOISE_STD
    for start in range(0, count, POOL_STYLES):
        plan = VideoPlan(start, f"pool{start}", "train", TASKS, 0, True)
        style = video_style(seed, plan)
        masks = face_masks(style, size)
        for i in range(start, min(count, start + POOL_STYLES)):
            noise = (rng.random((size, size, 3), dtype=np.float32) - np.float32(0.5)) * amplitude
            va, expr, au = (
                rng.uniform(-1, 1, 2),
                int(rng.integers(NUM_EXPR)),
                rng.integers(0, 2, 12),
            )
            image = draw_frame(masks, style, va, expr, au, noise)
            (folder / names[i]).write_bytes(encode_jpeg(image))
    (folder / ".complete").touch()
    return names


def plan_videos(frames: int, seed: int) -> list[VideoShape]:
    """Videos of an Aff-Wild2-shaped tree with about ``frames`` images (see the module docstring)."""
    rng = np.random.default_rng([seed, 1, frames])
    n = max(8, round(AFFWILD2_VIDEOS * math.sqrt(frames / AFFWILD2_FRAMES)))
    lines = round(frames / (1 - GAP_FRACTION))
    # Same spread as the full size; the bounds shrink with the mean length.
    scale = lines / n / (AFFWILD2_FRAMES / AFFWILD2_VIDEOS)
    low, high = max(10, LENGTH_RANGE[0] * scale), min(MAX_LINES, LENGTH_RANGE[1] * scale)
    lengths = rng.lognormal(0.0, LENGTH_SIGMA, n)
    for _ in range(8):  # renormalize to the total, clip to the bounds; converges in a few rounds
        lengths = np.clip(lengths * lines / lengths.sum(), low, high)
    lengths = np.floor(lengths).astype(np.int64)
    lengths[np.argmax(lengths)] += lines - lengths.sum()
    if lengths.max() > MAX_LINES:
        raise ValueError(f"{frames} frames do not fit in {n} videos of <= {MAX_LINES} frames")

    # Groups: a single subject or a _left/_right pair; the split is drawn per group (no leakage).
    groups = [[i, i + 1] if i % PAIR_EVERY == 0 and i + 1 < n else [i] for i in range(n)]
    groups = [g for g in groups if not (len(g) == 1 and g[0] % PAIR_EVERY == 1)]
    val = set(rng.permutation(len(groups))[: max(1, round(VAL_FRACTION * len(groups)))].tolist())
    names, splits = [""] * n, [""] * n
    for number, group in enumerate(groups):
        base = f"{group[0]}-30-1280x720" if group[0] % 3 == 0 else f"video{group[0]}"
        for member, suffix in zip(group, ("_left", "_right") if len(group) == 2 else ("",)):
            names[member], splits[member] = base + suffix, "val" if number in val else "train"

    has = {task: rng.random(n) < share for task, share in TASK_SHARE.items()}
    has["va"] |= ~(has["expr"] | has["au"])  # every video has at least one task
    for task in TASKS:  # every (task, split) has at least one video
        for split in LABELLED_SPLITS:
            if not any(has[task][i] for i in range(n) if splits[i] == split):
                has[task][splits.index(split)] = True
    return [
        VideoShape(names[i], splits[i], tuple(t for t in TASKS if has[t][i]), int(lengths[i]))
        for i in range(n)
    ]


# Label text by code, so a file is a join of table lookups (the tree's slow part would else be
# formatting 2.8M x 14 numbers one by one). The last entry of each table is the ignore marker.
VA_TEXT = [f"{k / 1000:.3f}" for k in range(-1000, 1001)]
EXPR_TEXT = [str(k) for k in range(NUM_EXPR)] + ["-1"]
AU_TEXT = [",".join("1" if code >> k & 1 else "0" for k in range(NUM_AU)) for code in range(4096)]
AU_TEXT.append(",".join(["-1"] * NUM_AU))


def annotation_text(task: str, lines: int, rng: np.random.Generator) -> str:
    """One task file of ``lines`` frames: header, random valid labels, IGNORE_FRACTION ignored."""
    ignored = rng.random(lines) < IGNORE_FRACTION
    if task == "va":
        values = rng.integers(0, len(VA_TEXT), (lines, 2)).tolist()
        rows = [f"{VA_TEXT[v]},{VA_TEXT[a]}" for v, a in values]
        for i in np.flatnonzero(ignored).tolist():
            rows[i] = "-5,-5"
    else:
        table = EXPR_TEXT if task == "expr" else AU_TEXT
        codes = rng.integers(0, len(table) - 1, lines)
        codes[ignored] = len(table) - 1
        rows = list(map(table.__getitem__, codes.tolist()))
    return ",".join(HEADERS[task]) + "\n" + "\n".join(rows) + "\n"


def build_tree(
    root: Path, videos: list[VideoShape], pool: Path, names: list[str], seed: int
) -> int:
    """Write the annotation files and link the images of ``videos`` into ``root``; return images."""
    rng = np.random.default_rng([seed, 2])
    images = 0
    pool_fd = os.open(pool, os.O_RDONLY)
    try:
        for video in videos:
            for task in video.tasks:
                path = annotation_path(root, task, video.split, video.name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(annotation_text(task, video.lines, rng))
            folder = root / FRAMES_DIR / video.name
            folder.mkdir(parents=True)
            frames = (np.flatnonzero(rng.random(video.lines) >= GAP_FRACTION) + 1).tolist()
            sources = rng.integers(0, len(names), len(frames)).tolist()
            folder_fd = os.open(folder, os.O_RDONLY)
            try:  # linkat with both folders open: no path walk per link
                for source, frame in zip(sources, frames):
                    os.link(
                        names[source], f"{frame:05d}.jpg", src_dir_fd=pool_fd, dst_dir_fd=folder_fd
                    )
            finally:
                os.close(folder_fd)
            images += len(frames)
    finally:
        os.close(pool_fd)
    return images


def ensure_tree(config: ScaleConfig, frames: int, pool: Path, names: list[str]) -> dict:
    """The tree of ``frames`` frames in the work folder (built now, or reused if made the same way)."""
    root = config.work / f"tree-{frames}"
    made = {"frames": frames, "seed": config.seed, "pool": len(names), "pool_dir": str(pool)}
    marker = root / ".complete"
    if marker.exists():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in made} == made:
            return {**info, "root": root, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    videos = plan_videos(frames, config.seed)
    images = build_tree(root, videos, pool, names, config.seed)
    info = {**made, "images": images, "videos": len(videos), "build_s": time.perf_counter() - start}
    marker.write_text(json.dumps(info))
    return {**info, "root": root, "reused": False}


# --- disk -----------------------------------------------------------------------------------------


def disk_needed(config: ScaleConfig) -> int:
    """Bytes the run writes: the pool plus the largest size (every size with --keep)."""
    per_size = [f * (SHARD_BYTES_PER_FRAME + TREE_BYTES_PER_FRAME) for f in config.sizes]
    return config.pool * POOL_JPEG_BYTES + (sum(per_size) if config.keep else max(per_size))


def check_disk(config: ScaleConfig) -> str | None:
    """A message refusing the run if ``work``'s file system lacks the space, else None."""
    where = config.work
    while not where.exists():
        where = where.parent
    free, need = shutil.disk_usage(where).free, disk_needed(config)
    if free >= need:
        return None
    sizes = ",".join(str(s) for s in config.sizes)
    return (
        f"error: --frames {sizes} needs about {need / 1e9:.2f} GB in {config.work} "
        f"({SHARD_BYTES_PER_FRAME / 1e3:.1f} KB per frame for shards"
        f"{', every size kept' if config.keep else ''}, plus a "
        f"{config.pool * POOL_JPEG_BYTES / 1e6:.0f} MB pool), but only {free / 1e9:.2f} GB are "
        f"free there; free space, pass --work on a larger disk, or measure fewer frames"
    )


# --- child processes ------------------------------------------------------------------------------

# Runs `python -m affectfast ARGS` in this process, then reports its own peak RSS as JSON in the file
# named by argv[1]. (Not RUSAGE_CHILDREN: a child forked from a big process, as `import torch` and
# spawn do, inherits its parent's RSS high-water mark; the parent samples the workers' PSS instead.)
MODULE_WRAPPER = """
import json, resource, runpy, sys
result, sys.argv = sys.argv[1], ["affectfast", *sys.argv[2:]]
code = 0
try:
    runpy.run_module("affectfast", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else (exit.code is not None)
with open(result, "w") as f:
    json.dump({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
sys.exit(code)
"""


def child_env() -> dict:
    """The environment of child processes: they import the affectfast this process imported."""
    package_root = str(Path(affectfast.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


def tree_pss(pid: int) -> int:
    """Proportional set size (bytes) of a process and all its descendants: shared pages (libraries,
    copy-on-write pages of forked workers) count once across the tree, unlike summed RSS."""
    total, todo = 0, [pid]
    while todo:
        pid = todo.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration, ValueError):  # the process ended while being read
            continue
    return total


def run_logged(command: list[str], log: Path, result: Path) -> dict:
    """Run ``command`` (output to ``log``); return the JSON it wrote to ``result``, its seconds and
    the peak PSS of its process tree (sampled every SAMPLE_S seconds)."""
    result.unlink(missing_ok=True)
    peak = 0
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env())
        while True:
            try:
                process.wait(timeout=SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                peak = max(peak, tree_pss(process.pid))
    seconds = time.perf_counter() - start
    if process.returncode != 0 or not result.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(
            f"{' '.join(command[:6])} ... failed ({process.returncode}); {log}:\n{tail}"
        )
    return {**json.loads(result.read_text()), "seconds": seconds, "tree_pss_peak": peak}


def run_affectfast(args: list[str], logs: Path, name: str) -> dict:
    """`python -m affectfast ARGS` in a fresh process: seconds, peak RSS of its main process and
    peak PSS of its process tree."""
    return run_logged(
        [sys.executable, "-c", MODULE_WRAPPER, str(logs / f"{name}.json"), *args],
        logs / f"{name}.log",
        logs / f"{name}.json",
    )


def run_child(spec: dict, logs: Path, name: str) -> dict:
    """This script in a fresh process (``--child``) running one measurement of ``spec``."""
    spec = {**spec, "result": str(logs / f"{name}.json")}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    return run_logged(command, logs / f"{name}.log", Path(spec["result"]))


def loader_api():
    """(build_loader, AugmentSpec), imported in the child only (the parent never loads torch)."""
    from affectfast.loaders import AugmentSpec, build_loader

    return build_loader, AugmentSpec


def rss_bytes() -> int:
    """This process's resident set now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """This process's resident set split (bytes): "anon" (heap, buffers) and "file" (mapped files:
    libraries, and the shards DALI's reader maps; reclaimable, but counted in RSS)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {
        part: int(fields[name].split()[0]) * 1024
        for part, name in (("anon", "RssAnon"), ("file", "RssFile"))
    }


def build_split_loader(spec: dict, split: str = "train", **extra):
    """The loader of ``spec["kind"]`` for ``split``, all tasks, augmentation on."""
    build_loader, augment_spec = loader_api()
    return build_loader(
        spec["kind"],
        spec["shards"],
        split,
        TASKS,
        spec["batch_size"],
        image_size=spec["image_size"],
        augment=augment_spec(),
        num_threads=spec["num_threads"],
        tree=spec.get("tree"),
        **extra,
    )


def stop(batches) -> None:
    """End an epoch's iteration early (a generator's ``finally`` tears its pipeline down)."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def batches_forever(loader, epoch: int):
    """Batch sizes of epoch after epoch, from ``epoch`` on."""
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield len(batch)
        epoch += 1


def warm_up_imports(spec: dict):
    """Build the kind's val loader: the modules a loader imports on first use (DALI, torchvision)
    are then loaded before the train loader is measured, and the train index is not yet cached.
    Returned so it stays alive (memory it frees would else be reused by the train loader)."""
    return build_split_loader(spec, "val")


def measure_loader(spec: dict) -> dict:
    """Construction, first batch, epoch boundaries, steady images/s and RSS of one loader kind."""
    warm = warm_up_imports(spec)
    before = rss_bytes()
    start = time.perf_counter()
    loader = build_split_loader(spec)
    construct = time.perf_counter() - start
    constructed = rss_bytes()
    if len(loader) < spec["warmup"] + 2:
        raise ValueError(f"{len(loader)} batches per epoch: too few to measure; use more frames")

    epoch = 0
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    boundary, teardown = [], []
    # DALI kinds keep one pipeline and run epochs in order: abandoning an epoch midway rebuilds it,
    # which is not their epoch boundary. Theirs is measured at the end of a whole epoch
    # (measure_epoch); wds and files set up every epoch afresh, so this loop measures theirs.
    rounds = 0 if spec["kind"].startswith("dali") else spec["boundaries"]
    for _ in range(rounds):
        for _ in range(spec["warmup"]):  # a running epoch, prefetch queues full
            next(batches)
        start = time.perf_counter()
        stop(batches)
        del batches
        closed = time.perf_counter()
        epoch += 1
        loader.set_epoch(epoch)
        batches = iter(loader)
        next(batches)
        boundary.append(time.perf_counter() - start)
        teardown.append(closed - start)
    stop(batches)
    del batches

    stream = batches_forever(loader, loader.epoch)  # DALI: still the abandoned first epoch
    for _ in range(spec["warmup"]):
        next(stream)
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < spec["seconds"]:
        window, images = time.perf_counter(), 0
        for _ in range(WINDOW):
            images += next(stream)
        rates.append(images / (time.perf_counter() - window))
    stream.close()
    return {
        "construct_s": construct,
        "first_batch_s": first,
        "boundary_s": statistics.median(boundary) if boundary else None,
        "teardown_s": statistics.median(teardown) if teardown else None,
        "images_per_s": statistics.median(rates),
        "windows": len(rates),
        "rss_before_bytes": before,
        "rss_growth_bytes": constructed - before,
        "batches_per_epoch": len(loader),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "val_batches": len(warm),
    }


def measure_index(spec: dict) -> dict:
    """Python-heap bytes the loader holds after construction (tracemalloc), and the peak during it."""
    import tracemalloc

    warm = warm_up_imports(spec)
    tracemalloc.start()
    loader = build_split_loader(spec)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del loader, warm
    return {"held_bytes": held, "peak_bytes": peak}


def measure_epoch(spec: dict) -> dict:
    """One whole dali-cpu train epoch with keys: each train sample exactly once? RSS along it:
    peak, and its anonymous and file-backed parts at the first batch, half the epoch and the end."""
    loader = build_split_loader(spec, with_keys=True, drop_last=False)
    expected = spec["train_samples"]
    # Key hashes (8 B per sample), allocated and touched now so they are in the starting RSS.
    seen = np.full(expected + spec["batch_size"], -1, dtype=np.int64)
    half = len(loader) // 2
    count, peak, parts, start = 0, 0, {}, time.perf_counter()
    last = start
    for i, batch in enumerate(loader):
        last = time.perf_counter()
        n = len(batch.keys)
        if count + n <= len(seen):
            seen[count : count + n] = np.fromiter(map(hash, batch.keys), np.int64, n)
        count += n
        peak = max(peak, rss_bytes())
        if i in (0, half):
            parts["first" if i == 0 else "half"] = rss_parts()
    seconds = time.perf_counter() - start
    parts["end"] = rss_parts()
    # The epoch boundary: from the last batch of this epoch to the first of the next (the drain,
    # the reader's reset and reshuffle, the first batch; a rebuilt pipeline would show here).
    loader.set_epoch(1)
    next(iter(loader))
    boundary = time.perf_counter() - last
    unique = len(np.unique(seen[: min(count, len(seen))]))
    return {
        "seconds": seconds,
        "samples": count,
        "unique": unique,
        "expected": expected,
        "exactly_once": count == unique == expected,
        "rss_peak": peak,
        "rss_parts": parts,
        "boundary_s": boundary,
    }


CHILD_MODES = {"loader": measure_loader, "index": measure_index, "epoch": measure_epoch}


def child_main(spec: dict) -> None:
    result = CHILD_MODES[spec["mode"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --- one size -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measured value of one size."""

    frames: int  # the size asked for
    stage: str
    metric: str
    unit: str
    value: float


def bench_size(config: ScaleConfig, frames: int, pool: Path, names: list[str]) -> list[Row]:
    """Every measurement of one size (see the module docstring)."""
    rows: list[Row] = []

    def add(stage: str, metric: str, unit: str, value: float | None) -> None:
        if value is None:  # not measured this way for this kind (see measure_loader)
            return
        rows.append(Row(frames, stage, metric, unit, float(value)))
        print(f"  {frames}: {stage} {metric} = {value:.4g} {unit}", file=sys.stderr, flush=True)

    logs = config.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[{frames} frames] tree ...", file=sys.stderr, flush=True)
    tree = ensure_tree(config, frames, pool, names)
    if tree["reused"]:
        print(f"  reusing {tree['root']} (built in {tree['build_s']:.1f} s)", file=sys.stderr)
    root, shards = tree["root"], config.work / f"shards-{frames}"
    images = tree["images"]
    add("tree", "images", "frames", images)
    add("tree", "videos", "videos", tree["videos"])
    add("tree", "build (hard links + annotations)", "s", tree["build_s"])

    for check in ("header", "full"):  # full last: its shards are the ones measured below
        runs = []
        for r in range(config.repeats):
            shutil.rmtree(shards, ignore_errors=True)  # pack resumes into an existing folder
            args = ["pack", str(root), "--out", str(shards), "--check", check]
            args += ["--workers", str(config.pack_workers)]
            runs.append(run_affectfast(args, logs, f"{frames}-pack-{check}-{r}"))
        add_process(add, f"pack --check {check}", runs, images)
    manifest = json.loads((shards / "manifest.json").read_text())
    train_samples = manifest["splits"]["train"]["samples"]
    add("shards", "train samples", "samples", train_samples)
    add("shards", "val samples", "samples", manifest["splits"]["val"]["samples"])
    runs = [
        run_affectfast(["verify", str(shards)], logs, f"{frames}-verify-{r}")
        for r in range(config.repeats)
    ]
    add_process(add, "verify", runs, images)
    size = sum(p.stat().st_size for p in shards.iterdir() if p.suffix in (".tar", ".idx"))
    add("shards", "tars + idx per frame", "B", size / images)

    spec = {
        "shards": str(shards),
        "tree": str(root),
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "num_threads": config.num_threads,
        "seconds": config.seconds,
        "warmup": config.warmup,
        "boundaries": config.boundaries,
        "train_samples": train_samples,
    }
    for kind in config.loaders:
        print(f"[{frames} frames] loader {kind} ...", file=sys.stderr, flush=True)
        index = run_child({**spec, "mode": "index", "kind": kind}, logs, f"{frames}-index-{kind}")
        got = run_child({**spec, "mode": "loader", "kind": kind}, logs, f"{frames}-loader-{kind}")
        add(kind, "construct", "s", got["construct_s"])
        add(kind, "iter to first batch", "s", got["first_batch_s"])
        add(kind, "epoch boundary", "s", got["boundary_s"])
        add(kind, "  of which teardown", "s", got["teardown_s"])
        add(kind, "steady", "images/s", got["images_per_s"])
        add(kind, "RSS after imports", "MiB", got["rss_before_bytes"] / 2**20)
        add(kind, "peak RSS main", "MiB", got["maxrss_kib"] / 1024)
        add(kind, "peak PSS all processes", "MiB", got["tree_pss_peak"] / 2**20)
        add(kind, "index per train sample (tracemalloc)", "B", index["held_bytes"] / train_samples)
        add(kind, "RSS growth per train sample", "B", got["rss_growth_bytes"] / train_samples)

    if config.full_epoch:
        print(f"[{frames} frames] one full dali-cpu epoch ...", file=sys.stderr, flush=True)
        spec = {**spec, "mode": "epoch", "kind": "dali-cpu"}
        got = run_child(spec, logs, f"{frames}-epoch")
        stage = "full epoch dali-cpu"
        add(stage, "epoch", "s", got["seconds"])
        add(stage, "train samples seen", "samples", got["samples"])
        add(stage, "each exactly once", "bool", got["exactly_once"])
        add(stage, "RSS peak", "MiB", got["rss_peak"] / 2**20)
        add(stage, "epoch boundary (last batch to next first)", "s", got["boundary_s"])
        for part, name in (("anon", "anonymous"), ("file", "file-backed")):
            for when, at in (
                ("first", "first batch"),
                ("half", "half epoch"),
                ("end", "epoch end"),
            ):
                add(stage, f"{name} RSS at {at}", "MiB", got["rss_parts"][when][part] / 2**20)
        if not got["exactly_once"]:
            print(
                f"  {frames}: full epoch saw {got['samples']} samples, {got['unique']} distinct, "
                f"manifest says {got['expected']}",
                file=sys.stderr,
            )

    if not config.keep:
        shutil.rmtree(shards, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def add_process(add, stage: str, runs: list[dict], images: int) -> None:
    """Rows of a command run ``repeats`` times: median seconds and frames/s, peak RSS."""
    seconds = statistics.median(r["seconds"] for r in runs)
    add(stage, "wall", "s", seconds)
    add(stage, "throughput", "frames/s", images / seconds)
    add(stage, "peak RSS main", "MiB", max(r["maxrss_kib"] for r in runs) / 1024)
    add(stage, "peak PSS all processes", "MiB", max(r["tree_pss_peak"] for r in runs) / 2**20)


# --- output ---------------------------------------------------------------------------------------


def slope(points: list[tuple[float, float]]) -> float | None:
    """Log-log slope from the smallest to the largest size (1 = linear), None if undefined."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    if len(points) < 2 or min(x0, y0, x1, y1) <= 0:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def series(rows: list[Row]) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(stage, metric, unit) -> [(frames, value)] in first-seen order."""
    out: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for row in rows:
        out.setdefault((row.stage, row.metric, row.unit), []).append((row.frames, row.value))
    return out


def format_table(rows: list[Row]) -> str:
    """One line per (stage, metric): its value per size, and the log-log slope with several."""
    sizes = sorted({row.frames for row in rows})
    data = series(rows)
    width = max(len(f"{s} {m} [{u}]") for s, m, u in data)
    header = f"{'stage metric [unit]':<{width}}" + "".join(f"{s:>12}" for s in sizes)
    header += f"{'slope':>8}" if len(sizes) > 1 else ""
    lines = [header]
    for (stage, metric, unit), points in data.items():
        values = dict(points)
        cells = "".join(f"{_fmt(values[s], unit) if s in values else '-':>12}" for s in sizes)
        line = f"{f'{stage} {metric} [{unit}]':<{width}}" + cells
        if len(sizes) > 1:
            k = slope(points) if unit not in ("bool", "frames", "videos", "samples") else None
            line += f"{k:>8.2f}" if k is not None else f"{'':>8}"
        lines.append(line)
    return "\n".join(lines)


def _fmt(value: float, unit: str) -> str:
    if unit == "bool":
        return "yes" if value else "NO"
    if value == int(value) and abs(value) >= 100:
        return f"{int(value)}"
    return f"{value:.4g}"


def write_csv(rows: list[Row], path: Path) -> None:
    """CSV, one row per value: frames,stage,metric,unit,value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["frames", "stage", "metric", "unit", "value"])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


PLOT_PANELS = (("s", "seconds"), ("MiB", "peak / resident MiB"), ("B", "bytes per frame or sample"))


def write_plot(rows: list[Row], path: Path) -> None:
    """Log-log PNG of each cost (seconds, MiB, bytes) against frames, with a linear guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(rows)
    sizes = sorted({row.frames for row in rows})
    stages = list(dict.fromkeys(stage for stage, _, _ in data))
    colours = plt.get_cmap("tab10")
    markers = "osD^vP*Xh"
    fig, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(6 * len(PLOT_PANELS), 5.5))
    for ax, (unit, label) in zip(axes, PLOT_PANELS):
        lines = {k: v for k, v in data.items() if k[2] == unit and all(y > 0 for _, y in v)}
        drawn: dict[str, int] = {}  # lines per stage so far: one colour per stage, a marker each
        for (stage, metric, _), points in lines.items():
            xs, ys = zip(*points)
            n = drawn[stage] = drawn.get(stage, -1) + 1
            ax.plot(
                xs,
                ys,
                color=colours(stages.index(stage) % 10),
                marker=markers[n % len(markers)],
                linestyle=("-", "--", "-.", ":")[n // len(markers) % 4],
                label=f"{stage} {metric.strip()}",
            )
        if lines and len(sizes) > 1:  # slope 1 through the median first value
            y0 = statistics.median(v[0][1] for v in lines.values())
            ax.plot(sizes, [y0 * s / sizes[0] for s in sizes], "k:", linewidth=2, label="linear")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle("affectfast at scale (one machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv=None) -> ScaleConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--frames",
        type=parse_sizes,
        default=(28_000,),
        help="sizes in frames, comma-separated: 28k, 280k, 2.8M (default 28k)",
    )
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "affectfast-scale"
    )
    parser.add_argument("--csv", type=Path, default=Path("runs/bench_scale.csv"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG [default: CSV with .png]")
    parser.add_argument(
        "--loaders", default=",".join(LOADER_CHOICES), help=f"subset of {','.join(LOADER_CHOICES)}"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seconds", type=float, default=10.0, help="steady timing per loader")
    parser.add_argument("--warmup", type=int, default=3, help="batches")
    parser.add_argument("--boundaries", type=int, default=3, help="epoch boundaries per loader")
    parser.add_argument("--repeats", type=int, default=1, help="pack and verify runs (median)")
    parser.add_argument("--pack-workers", type=int, default=2)
    parser.add_argument("--num-threads", type=int, default=2, help="DALI threads / workers")
    parser.add_argument("--pool", type=int, default=2_048, help="distinct JPEGs in the tree")
    parser.add_argument("--full-epoch", action="store_true", help="one whole dali-cpu epoch")
    parser.add_argument("--keep", action="store_true", help="keep trees and shards")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return ScaleConfig(
            sizes=args.frames,
            work=args.work,
            csv=args.csv,
            plot=args.plot or args.csv.with_suffix(".png"),
            loaders=tuple(k.strip() for k in args.loaders.split(",") if k.strip()),
            batch_size=args.batch_size,
            image_size=args.image_size,
            seconds=args.seconds,
            warmup=args.warmup,
            boundaries=args.boundaries,
            repeats=args.repeats,
            pack_workers=args.pack_workers,
            num_threads=args.num_threads,
            pool=args.pool,
            full_epoch=args.full_epoch,
            keep=args.keep,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))


def main(argv=None) -> int:
    config = parse_args(argv)
    refusal = check_disk(config)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    config.work.mkdir(parents=True, exist_ok=True)
    print(
        f"sizes {config.sizes}, work {config.work}, {os.cpu_count()} cores, "
        f"{shutil.disk_usage(config.work).free / 1e9:.0f} GB free",
        file=sys.stderr,
    )
    pool = config.work / f"pool-{config.pool}-s{config.seed}"
    names = make_pool(pool, config.pool, config.seed)
    jpeg = sum((pool / n).stat().st_size for n in names) / len(names)
    print(f"pool: {len(names)} frames, {jpeg:.0f} B of JPEG each", file=sys.stderr)
    rows = []
    for frames in config.sizes:
        rows += bench_size(config, frames, pool, names)
        write_csv(rows, config.csv)  # after each size: a long run keeps what it measured
    print(format_table(rows))
    write_plot(rows, config.plot)
    print(f"wrote {config.csv} and {config.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
