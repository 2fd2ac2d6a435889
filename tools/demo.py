"""The README's main job, end to end on the CPU: synthesize, pack, verify, benchmark loaders, run the study.

Run it with ``make demo`` (which installs first). Everything lands under ``demo/`` (git-ignored); a
second run reuses the tree and shards and skips finished training runs. Set DEMO_FRESH=1 to start over.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
TREE, SHARDS, STUDY = DEMO / "tree", DEMO / "shards", DEMO / "study"
AFFECTFAST = [sys.executable, "-m", "affectfast"]


def run(step: str, *args: str) -> None:
    """Run one affectfast command, echoing it, and stop the demo if it fails."""
    print(f"\n=== {step}: affectfast {' '.join(args)}", flush=True)
    subprocess.run([*AFFECTFAST, *args], check=True, cwd=ROOT)


def main() -> None:
    if os.environ.get("DEMO_FRESH") and DEMO.exists():
        shutil.rmtree(DEMO)
    start = time.perf_counter()
    complete = DEMO / ".tree-complete"
    if not complete.exists():  # no tree yet, or a synth that was killed midway: start over
        shutil.rmtree(DEMO, ignore_errors=True)
        run(
            "1/5 synthesize an Aff-Wild2-layout tree",
            "synth",
            str(TREE),
            "--videos",
            "24",
            "--frames",
            "160",
            "--seed",
            "0",
        )
        complete.touch()
    run("2/5 pack it into shards", "pack", str(TREE), "--out", str(SHARDS), "--shard-size", "1000")
    run("3/5 verify the shards", "verify", str(SHARDS))
    run(
        "4/5 benchmark the loaders",
        "bench",
        "loaders",
        str(SHARDS),
        "--tree",
        str(TREE),
        "--loaders",
        "dali-cpu,wds,files",
        "--batch-size",
        "256",
        "--image-size",
        "112",
        "--seconds",
        "6",
        "--csv",
        str(DEMO / "bench_loaders.csv"),
        "--plot",
        str(DEMO / "bench_loaders.png"),
    )
    run(
        "5/5 uni-task vs multi-task study",
        "study",
        str(SHARDS),
        "--out",
        str(STUDY),
        "--inits",
        "scratch",
        "--epochs",
        "4",
        "--batch-size",
        "64",
        "--image-size",
        "48",
        "--lr",
        "3e-3",
    )
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s; results: {STUDY / 'results.md'}, "
        f"curves: {STUDY / 'curves.png'}, loader benchmark: {DEMO / 'bench_loaders.png'}"
    )


if __name__ == "__main__":
    main()
