"""Pack throughput against two floors measured in the same run on the same files, and peak memory.

Floors: ``tar cf`` of the image files (floor 1) and a plain loop that reads and
fully decodes each JPEG with the same number of processes (floor 2). Goals: ``pack --check full``
>= 0.8x floor 2; ``pack --check header`` >= 0.5x floor 1. Each measurement is the median of
``--repeats`` runs after one warm-up run (which also fills the page cache).

Memory: peak RSS (ru_maxrss) of a whole pack (main process and, separately, its largest worker),
and of the reader + global index at ``--index-frames`` frames, extrapolated linearly to the
2.8M frames of Aff-Wild2.

    .venv/bin/python benchmarks/bench_pack.py                       # 50 videos x 500 frames, 112 px
    .venv/bin/python benchmarks/bench_pack.py --workers 1 2 4 --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from PIL import Image

from affectfast.affwild2 import find_annotation_dirs, image_path, read_tree
from affectfast.pack import PackConfig, pack
from affectfast.synth import SynthConfig, synthesize

AFFWILD2_FRAMES = 2_800_000


def make_tree(cache: Path, videos: int, frames: int, size: int) -> Path:
    """The synthetic tree, generated once into the cache folder."""
    root = cache / f"tree-v{videos}-f{frames}-s{size}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {root} (once)...", file=sys.stderr)
        synthesize(
            SynthConfig(
                out=root,
                videos=videos,
                frames=frames,
                seed=0,
                image_size=size,
                workers=os.cpu_count() or 1,
            )
        )
        (root / ".complete").touch()
    return root


def image_files(root: Path) -> list[Path]:
    """The images pack writes (frames with a valid label), in reader order."""
    dirs = find_annotation_dirs(root)
    return [image_path(dirs.frames, v.name, int(f)) for v in read_tree(dirs) for f in v.frames]


def tar_floor(files: list[Path], scratch: Path, workers: int) -> None:
    """Floor 1: GNU ``tar cf`` of the image files into a real file (tar skips reads for /dev/null)."""
    listing = scratch / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in files))
    subprocess.run(["tar", "cf", str(scratch / "floor.tar"), "-P", "-T", str(listing)], check=True)
    (scratch / "floor.tar").unlink()


def _read_decode(paths: list[str]) -> int:
    for path in paths:
        with Image.open(io.BytesIO(Path(path).read_bytes())) as image:
            image.load()
    return len(paths)


def decode_floor(files: list[Path], scratch: Path, workers: int) -> None:
    """Floor 2: read and fully decode every JPEG, split over ``workers`` processes."""
    paths = [str(p) for p in files]
    if workers == 1:
        _read_decode(paths)
        return
    chunks = [paths[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_read_decode, chunks)


def pack_run(root: Path, scratch: Path, workers: int, check: str) -> None:
    out = scratch / "shards"
    shutil.rmtree(out, ignore_errors=True)
    pack(PackConfig(root=root, out=out, workers=workers, check=check), progress=False)
    shutil.rmtree(out)


def timed(function, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PACK_MEMORY = textwrap.dedent("""
    import resource, sys
    from affectfast.pack import PackConfig, pack
    pack(PackConfig(root=sys.argv[1], out=sys.argv[2], workers=int(sys.argv[3])), progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")

INDEX_MEMORY = textwrap.dedent("""
    import os, resource, sys
    from affectfast.affwild2 import find_annotation_dirs, read_tree
    from affectfast.pack import PackConfig, build_index, fingerprint_source, plan_shards
    # Resident set now (KiB), after the imports: the baseline the index grows from.
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    dirs = find_annotation_dirs(sys.argv[1])
    index = build_index(read_tree(dirs), dirs.frames)
    fingerprint_source(dirs, index.videos)
    plan_shards(index, PackConfig(root=sys.argv[1], out="unused"))
    print(len(index), before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def peak_memory_kib(script: str, *args: str) -> list[int]:
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True
    )
    return [int(x) for x in result.stdout.split()]


def make_index_tree(cache: Path, frames: int, per_video: int = 500) -> Path:
    """An Aff-Wild2-layout tree of ``frames`` frames whose images are empty files: enough for the
    reader and the index, which never open an image."""
    root = cache / f"index-tree-{frames}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    heads = {
        "VA_Estimation_Challenge": ("valence,arousal", "0.5,-0.25"),
        "EXPR_Recognition_Challenge": (
            "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other",
            "3",
        ),
        "AU_Detection_Challenge": (
            "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26",
            "0,1,0,0,1,0,0,0,1,0,0,1",
        ),
    }
    for v in range(frames // per_video):
        video = f"video{v}"
        split = "Train_Set" if v % 5 else "Validation_Set"
        folder = root / "cropped_aligned" / video
        folder.mkdir(parents=True)
        for f in range(1, per_video + 1):
            (folder / f"{f:05d}.jpg").touch()
        for challenge, (header, line) in heads.items():
            path = root / "annotations" / challenge / split / f"{video}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(header + "\n" + (line + "\n") * per_video)
    (root / ".complete").touch()
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "affectfast-bench"
    )
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--index-frames", type=int, default=100_000)
    parser.add_argument("--memory-only", action="store_true", help="Skip the throughput runs.")
    parser.add_argument(
        "--csv", type=Path, default=None, help="CSV of the results [default: CACHE/bench_pack.csv]"
    )
    args = parser.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    root = make_tree(args.cache, args.videos, args.frames, args.size)
    files = image_files(root)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"{len(files)} frames, {megabytes:.1f} MB of JPEG ({args.size} px), {os.cpu_count()} "
        f"cores; median of {args.repeats} after a warm-up",
        file=sys.stderr,
    )

    rows = []
    with tempfile.TemporaryDirectory(dir=args.cache) as scratch_dir:
        scratch = Path(scratch_dir)
        for workers in [] if args.memory_only else args.workers:
            measured = {
                "tar cf (floor 1)": lambda w=workers: tar_floor(files, scratch, w),
                "read+decode (floor 2)": lambda w=workers: decode_floor(files, scratch, w),
                "pack --check full": lambda w=workers: pack_run(root, scratch, w, "full"),
                "pack --check header": lambda w=workers: pack_run(root, scratch, w, "header"),
            }
            seconds = {name: timed(run, args.repeats) for name, run in measured.items()}
            floor = {
                "pack --check full": "read+decode (floor 2)",
                "pack --check header": "tar cf (floor 1)",
            }
            for name, secs in seconds.items():
                ratio = seconds[floor[name]] / secs if name in floor else None
                rows.append(
                    {
                        "method": name,
                        "workers": 1 if name.startswith("tar") else workers,
                        "seconds": round(secs, 3),
                        "frames_per_s": round(len(files) / secs),
                        "mb_per_s": round(megabytes / secs, 1),
                        "ratio_to_floor": round(ratio, 2) if ratio else "",
                    }
                )
                print(
                    f"{name:24s} workers {rows[-1]['workers']}  {rows[-1]['frames_per_s']:7d} "
                    f"frames/s  {rows[-1]['mb_per_s']:6.1f} MB/s"
                    + (f"  {ratio:.2f}x {floor[name]}" if ratio else ""),
                    flush=True,
                )

        main_kib, worker_kib = peak_memory_kib(
            PACK_MEMORY, str(root), str(scratch / "mem"), str(max(args.workers))
        )
    index_root = make_index_tree(args.cache, args.index_frames)
    frames, before_kib, after_kib = peak_memory_kib(INDEX_MEMORY, str(index_root))
    per_frame = (after_kib - before_kib) * 1024 / frames  # includes fixed costs: an upper bound
    print(
        f"pack peak RSS ({len(files)} frames, {max(args.workers)} workers): main "
        f"{main_kib / 1024:.0f} MiB, largest worker {worker_kib / 1024:.0f} MiB"
    )
    print(
        f"reader+index at {frames} frames: {after_kib / 1024:.0f} MiB peak, "
        f"{(after_kib - before_kib) / 1024:.1f} MiB over the imports ({per_frame:.0f} B/frame) "
        f"-> {AFFWILD2_FRAMES / 1e6:.1f}M frames: about "
        f"{(before_kib * 1024 + per_frame * AFFWILD2_FRAMES) / 2**30:.2f} GiB"
    )
    rows.append(
        {
            "method": "pack peak RSS main/worker MiB",
            "workers": max(args.workers),
            "seconds": "",
            "frames_per_s": "",
            "mb_per_s": "",
            "ratio_to_floor": f"{main_kib / 1024:.0f}/{worker_kib / 1024:.0f}",
        }
    )
    rows.append(
        {
            "method": f"reader+index B/frame at {frames}",
            "workers": 1,
            "seconds": "",
            "frames_per_s": "",
            "mb_per_s": "",
            "ratio_to_floor": f"{per_frame:.0f}",
        }
    )
    args.csv = args.csv or args.cache / "bench_pack.csv"
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
