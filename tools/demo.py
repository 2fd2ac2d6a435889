"""The README's main job, end to end on the CPU: synthesize, pack, verify, benchmark loaders, run the
study (frame models, then temporal heads on the multi-task model's features), compare frame / frame +
smoothing / temporal on val, then a complete test-set submission from the temporal head: smoothing
tuned on val, every frame predicted, checked.

Run it with ``make demo`` (which installs first). Everything lands under ``demo/`` (git-ignored); a
second run reuses the tree and shards and skips finished training runs. Set DEMO_FRESH=1 to start over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from affectfast.predict import check_submission
from affectfast.synth import FRAME_COUNTS_FILE, TEST_LISTS, TEST_LISTS_DIR

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
TREE, SHARDS, STUDY = DEMO / "tree", DEMO / "shards", DEMO / "study"
SUBMISSION = DEMO / "submission"
AFFECTFAST = [sys.executable, "-m", "affectfast"]
STEPS = 9
# The demo's heads: 3 steps an epoch (18 windows), kept short for the 10-minute budget.
TEMPORAL_EPOCHS = "12"


def run(step: int, what: str, *args: str, capture: bool = False) -> str:
    """Run one affectfast command, echoing it, and stop the demo if it fails."""
    print(f"\n=== {step}/{STEPS} {what}: affectfast {' '.join(args)}", flush=True)
    done = subprocess.run(
        [*AFFECTFAST, *args], check=True, cwd=ROOT, stdout=subprocess.PIPE if capture else None
    )
    return done.stdout.decode() if capture else ""


def expected_submission() -> dict[str, dict[str, int]]:
    """What the test lists and frame_counts.csv of the tree ask for: frames per (task, video)."""
    lists = TREE / TEST_LISTS_DIR
    rows = (lists / FRAME_COUNTS_FILE).read_text().splitlines()[1:]
    counts = {video: int(n) for video, n in (row.split(",") for row in rows)}
    return {
        task: {video: counts[video] for video in (lists / name).read_text().split()}
        for task, name in TEST_LISTS.items()
    }


def smoothing_table(smoothing: dict) -> str:
    """Markdown: each task's val score without and with its tuned smoothing window."""
    lines = ["| task | metric | raw (val) | smoothed (val) | window |", "|---|---|---|---|---|"]
    for task, entry in smoothing["scores"].items():
        lines.append(
            f"| {task} | {entry['metric']} | {entry['raw']:.3f} | {entry['smoothed']:.3f} "
            f"| {smoothing['windows'][task]} |"
        )
    return "\n".join(lines)


def main() -> None:
    if os.environ.get("DEMO_FRESH") and DEMO.exists():
        shutil.rmtree(DEMO)
    start = time.perf_counter()
    complete = DEMO / ".tree-complete"
    # No tree yet, a synth that was killed midway, or a tree of an older demo without a test set.
    if not complete.exists() or not (TREE / TEST_LISTS_DIR).is_dir():
        shutil.rmtree(DEMO, ignore_errors=True)
        run(
            1,
            "synthesize an Aff-Wild2-layout tree (10% noisy frames, 6 test videos)",
            *("synth", str(TREE), "--videos", "24", "--frames", "160", "--seed", "0"),
            *("--noisy-frames", "0.1", "--test-videos", "6"),
        )
        complete.touch()
    test_lists = [
        option
        for task, name in TEST_LISTS.items()
        for option in ("--test-videos", f"{task}={TREE / TEST_LISTS_DIR / name}")
    ]
    run(
        2,
        "pack it into shards, the test set as an image-only split",
        *("pack", str(TREE), "--out", str(SHARDS), "--shard-size", "1000", *test_lists),
    )
    run(3, "verify the shards", "verify", str(SHARDS))
    run(
        4,
        "benchmark the loaders",
        *("bench", "loaders", str(SHARDS), "--tree", str(TREE)),
        *("--loaders", "dali-cpu,wds,files", "--batch-size", "256", "--image-size", "112"),
        *("--seconds", "4", "--csv", str(DEMO / "bench_loaders.csv")),
        *("--plot", str(DEMO / "bench_loaders.png")),
    )
    run(
        5,
        "uni-task vs multi-task study: frame models, then GRU heads on the multi-task features",
        *("study", str(SHARDS), "--out", str(STUDY), "--inits", "scratch", "--epochs", "4"),
        *("--batch-size", "64", "--image-size", "48", "--lr", "3e-3"),
        *("--temporal", "gru", "--temporal-epochs", TEMPORAL_EPOCHS),
    )
    frame_best = STUDY / "scratch" / "multi" / "best.pt"
    features = STUDY / "scratch" / "features"
    temporal_best = STUDY / "scratch" / "gru-multi" / "best.pt"
    frame = evaluate(6, "tune smoothing on val for the multi-task frame model", frame_best)
    temporal = evaluate(
        7,
        "score the GRU head on val (and tune its smoothing)",
        temporal_best,
        "--features",
        str(features),
    )
    run(
        8,
        "predict the test set with the GRU head (test features extracted on the fly), smoothed",
        *("predict", str(temporal_best), str(SHARDS), "--split", "test", "--smooth"),
        *("--frame-counts", str(TREE / TEST_LISTS_DIR / FRAME_COUNTS_FILE)),
        *("--out", str(SUBMISSION)),
    )
    print(f"\n=== 9/{STEPS} check the submission against the test lists and frame_counts.csv")
    files = check_submission(SUBMISSION, expected_submission())
    print(f"{SUBMISSION}: {files} files in the ABAW format, a line for every frame")
    print("\nTemporal smoothing on val, multi-task frame model (windows saved beside best.pt):\n")
    print(smoothing_table(frame["smoothing"]))
    print("\nFrame model, frame model + smoothing, GRU head (+ smoothing), multi-task, on val:\n")
    print(side_by_side(frame, temporal))
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s; results: {STUDY / 'results.md'}, "
        f"curves: {STUDY / 'curves.png'}, loader benchmark: {DEMO / 'bench_loaders.png'}, "
        f"submission: {SUBMISSION}"
    )


def evaluate(step: int, what: str, checkpoint: Path, *options: str) -> dict:
    """``affectfast evaluate CHECKPOINT --tune-smoothing --json`` on val: metrics and smoothing."""
    args = ("evaluate", str(checkpoint), str(SHARDS), "--tune-smoothing", "--json", *options)
    return json.loads(run(step, what, *args, capture=True))


def side_by_side(frame: dict, temporal: dict) -> str:
    """Markdown: CCC (mean), F1-EXPR and F1-AU of each stage, raw and with tuned smoothing."""
    lines = ["| model | CCC (mean) | F1-EXPR | F1-AU |", "|---|---|---|---|"]
    for name, metrics in (("frame", frame), ("GRU head", temporal)):
        scores = metrics["smoothing"]["scores"]
        for kind, label in (("raw", name), ("smoothed", f"{name} + smoothing")):
            cells = [scores[t][kind] for t in ("va", "expr", "au")]
            lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
