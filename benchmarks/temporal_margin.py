"""Does the temporal head beat the frame model with its tuned smoothing? One held-out experiment.

Two synthetic trees of the same kind (``--onset-cues K``: cues only at segment onsets; 0: the
ordinary tree), A and B, made with different seeds. The frame model trains on A. Everything else
happens on B, whose videos the frame model never saw, as a real frame model never saw the test
videos: its features are extracted from B, the frame model's smoothing is tuned on B's val split
(``evaluate --tune-smoothing``), a GRU head trains on B's train features with train-temporal's
defaults, and is scored on B's val split. Why two trees: a frame model learns the hidden frames of
its own training videos by heart (on a small tree it scores F1-EXPR ~0.9 on them and ~0.15 on
unseen ones), so features of those videos teach a temporal head to read labels it will not find in
unseen videos' features.

Prints every command, then a table: frame / frame + smoothing / GRU head on B's val, and the
margins the issue asks for (GRU - frame + smoothing: F1-EXPR >= 0.10, F1-AU >= 0.05, CCC within
0.02). Writes ``WORK/margin.json``. About 10 minutes on a 2-core CPU at the defaults.

    PYTHONPATH=. .venv/bin/python benchmarks/temporal_margin.py --work /tmp/margin
    PYTHONPATH=. .venv/bin/python benchmarks/temporal_margin.py --work /tmp/margin0 --onset-cues 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

AFFECTFAST = [sys.executable, "-m", "affectfast"]
FRAME_TRAINING = (
    *("--tasks", "va,expr,au", "--loader", "dali-cpu", "--batch-size", "64"),
    *("--image-size", "48", "--lr", "3e-3"),
)
TASK_METRICS = {"va": "CCC (mean)", "expr": "F1-EXPR", "au": "F1-AU"}
GOALS = {"expr": 0.10, "au": 0.05}  # the least the head must gain over frame + smoothing
CCC_TOLERANCE = 0.02  # the most the head may lose on CCC


def affectfast(*args: str, capture: bool = False) -> str:
    """Run one affectfast command, echoing it; stop at the first failure."""
    print(f"$ affectfast {' '.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(
        [*AFFECTFAST, *args], check=True, stdout=subprocess.PIPE if capture else None
    )
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return done.stdout.decode() if capture else ""


def make_tree(work: Path, name: str, seed: int, videos: int, args) -> Path:
    """Synthesize and pack one tree (reused when its shards are there)."""
    shards = work / f"shards-{name}"
    if not (shards / "manifest.json").is_file():
        tree = work / f"tree-{name}"
        affectfast(
            *("synth", str(tree), "--videos", str(videos), "--frames", str(args.frames)),
            *("--seed", str(seed), "--onset-cues", str(args.onset_cues)),
        )
        affectfast("pack", str(tree), "--out", str(shards))
    return shards


def scores(metrics: dict) -> dict[str, dict[str, float]]:
    """Per task, the raw and smoothed val scores of an ``evaluate --tune-smoothing --json``."""
    return {task: metrics["smoothing"]["scores"][task] for task in TASK_METRICS}


def evaluate(checkpoint: Path, shards: Path, *options: str) -> dict:
    args = ("evaluate", str(checkpoint), str(shards), "--tune-smoothing", "--json", *options)
    return scores(json.loads(affectfast(*args, "--loader", "dali-cpu", capture=True)))


def run(args) -> dict:
    """The experiment; returns the val scores and the margins."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    shards_a = make_tree(work, "a", args.seed, args.videos, args)
    shards_b = make_tree(work, "b", args.seed + 1, args.held_out_videos, args)
    frame_run = work / "frame"
    if not (frame_run / "best.pt").is_file():
        affectfast(
            "train", str(shards_a), "--out", str(frame_run), "--epochs", str(args.frame_epochs),
            *FRAME_TRAINING,
        )  # fmt: skip
    features = work / "features-b"
    if not (features / "features.json").is_file():
        affectfast(
            "extract", str(frame_run / "best.pt"), str(shards_b), "--out", str(features),
            "--split", "train,val", "--loader", "dali-cpu",
        )  # fmt: skip
    frame = evaluate(frame_run / "best.pt", shards_b)
    head_run = work / f"{args.model}-b"
    if not (head_run / "best.pt").is_file():
        affectfast(
            "train-temporal", str(features), "--tasks", "va,expr,au", "--model", args.model,
            "--out", str(head_run), "--device", "cpu",
        )  # fmt: skip
    head = evaluate(head_run / "best.pt", shards_b, "--features", str(features))
    margins = {t: head[t]["raw"] - frame[t]["smoothed"] for t in TASK_METRICS}
    return {"frame": frame, "head": head, "margins": margins, "onset_cues": args.onset_cues}


def format_result(result: dict, model: str) -> str:
    """The side-by-side table and the margins against the goals."""
    lines = [
        "| on B's val | " + " | ".join(TASK_METRICS.values()) + " |",
        "|---|" + "---|" * len(TASK_METRICS),
    ]
    rows = (
        ("frame", result["frame"], "raw"),
        ("frame + tuned smoothing", result["frame"], "smoothed"),
        (f"{model} head", result["head"], "raw"),
        (f"{model} head + tuned smoothing", result["head"], "smoothed"),
    )
    for label, scores_, kind in rows:
        lines.append(
            f"| {label} | " + " | ".join(f"{scores_[t][kind]:.3f}" for t in TASK_METRICS) + " |"
        )
    margin = result["margins"]
    lines.append(
        f"\n{model} head - (frame + tuned smoothing): CCC {margin['va']:+.3f} (goal >= "
        f"-{CCC_TOLERANCE}), F1-EXPR {margin['expr']:+.3f} (goal >= +{GOALS['expr']}), "
        f"F1-AU {margin['au']:+.3f} (goal >= +{GOALS['au']})"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The experiment's options and their defaults (tests/test_temporal_margin.py runs these)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for trees, runs, results")
    parser.add_argument(
        "--onset-cues", type=int, default=6, help="synth --onset-cues (0: ordinary)"
    )
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--held-out-videos", type=int, default=72, help="videos of tree B")
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="tree A's seed; B's is seed + 1")
    parser.add_argument("--frame-epochs", type=int, default=12)
    parser.add_argument("--model", default="gru", choices=("gru", "tcn", "transformer"))
    return parser


def main() -> None:
    args = build_parser().parse_args()
    start = time.perf_counter()
    result = run(args)
    (args.work / "margin.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + format_result(result, args.model))
    print(f"\n{time.perf_counter() - start:.0f} s in all; {args.work / 'margin.json'}")


if __name__ == "__main__":
    main()
