"""Check 5: pixel parity, the same val frames from two loader kinds, frame by frame.

Three passes, so that every GPU stage the loader can run is compared with its CPU twin: the
decoders alone (frames at their own size where the pack's are ``image_size``), a resize (another
image size), and a rotation (augmentation on, flip off). Both DALI kinds draw the rotation angles
from the same pipeline seed; a kind with other random draws (``wds``) skips the rotation pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from affectfast.config import AugmentSpec
from affectfast.doctor.check import FAILED, PASSED, Check, no_cuda_reason, not_run
from affectfast.doctor.plan import Plan
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

PARITY_MEAN_TOLERANCE = 0.02  # mean |a - b| over a pass's frames, normalized units (a level ~0.017)
# Mean |a - b| of the worst single frame, about 6 levels: JPEG decoders round differently, but a
# misplaced, shifted or differently rotated frame differs by ten times more. The mean over a pass
# alone would hide one wrong frame among hundreds.
PARITY_FRAME_TOLERANCE = 0.1
PARITY_DEGREES = 10.0  # the rotation pass: uniform in +-degrees, train's default range
DALI_KINDS = ("dali-gpu", "dali-cpu")  # the same graph and seed: the same random draws


@dataclass(frozen=True)
class ParityPass:
    """One comparison: frames resized to ``image_size``, with ``augment`` (None: off)."""

    name: str
    image_size: int
    augment: AugmentSpec | None = None

    def describe(self) -> str:
        if self.augment is None:
            return f"{self.name}, {self.image_size} px"
        return (
            f"{self.name}, {self.image_size} px, +-{self.augment.degrees:g} deg "
            f"{self.augment.interpolation}, flip off"
        )


def parity_passes(image_size: int) -> tuple[ParityPass, ...]:
    """The decoders at ``image_size``, a resize to 3/4 of it, and a rotation at it."""
    return (
        ParityPass("decoders", image_size),
        ParityPass("resize", max(32, image_size * 3 // 4)),
        ParityPass("rotation", image_size, AugmentSpec(flip=False, degrees=PARITY_DEGREES)),
    )


def first_batches(
    shards: Path, kind: str, device: torch.device, plan: Plan, batches: int, way: ParityPass
) -> tuple[list[str], torch.Tensor]:
    """Keys and float32 CPU images of the first ``batches`` val batches of one loader kind."""
    loader = build_loader(
        kind,
        shards,
        "val",
        TASKS,
        plan.small_batch,
        image_size=way.image_size,
        augment=way.augment,
        shuffle=False,
        device=device,
        dtype=torch.float32,
        with_keys=True,
        num_threads=1 if kind == "wds" else plan.loader_threads,  # one worker: the val order
    )
    keys, images = [], []
    for batch in islice(loader, batches):
        keys += batch.keys
        images.append(batch.images.float().cpu())
    return keys, torch.cat(images)


def compare_frames(keys_a: list[str], a: torch.Tensor, keys_b: list[str], b: torch.Tensor) -> dict:
    """Frame-by-frame |a - b| of two loaders' batches: mean over all, max, and the worst frame
    (largest mean |diff|); ``keys_differ`` when they are not the same frames in the same order."""
    if keys_a != keys_b:
        return {"keys_differ": True, "frames": (len(keys_a), len(keys_b)), "keys": keys_a[:4]}
    diff = (a - b).abs()
    per_frame = diff.flatten(1).mean(1)
    worst = int(per_frame.argmax())
    return {
        "keys_differ": False,
        "frames": len(keys_a),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
        "worst_frame": keys_a[worst],
        "worst_frame_mean": float(per_frame[worst]),
    }


def judge(result: dict, tolerance: float, frame_tolerance: float) -> str | None:
    """What is wrong with one pass's comparison, or None."""
    if result["keys_differ"]:
        count_a, count_b = result["frames"]
        return f"different frames or order ({count_a} vs {count_b} keys)"
    if result["mean_abs_diff"] >= tolerance:
        return f"mean |diff| {result['mean_abs_diff']:.4f} >= {tolerance}"
    if result["worst_frame_mean"] >= frame_tolerance:
        return (
            f"frame {result['worst_frame']} differs by {result['worst_frame_mean']:.4f} on "
            f"average (>= {frame_tolerance})"
        )
    return None


def check_pixel_parity(
    shards: Path,
    plan: Plan,
    kinds: tuple[str, str] = ("dali-gpu", "dali-cpu"),
    batches: int = 4,
    tolerance: float = PARITY_MEAN_TOLERANCE,
    frame_tolerance: float = PARITY_FRAME_TOLERANCE,
) -> Check:
    """The same val frames (same order) from two loader kinds, in each pass of
    :func:`parity_passes`: mean and max |diff|, and the frame that differs most."""
    title = f"pixel parity {kinds[0]} vs {kinds[1]} (decoders, resize, rotation)"
    criterion = (
        f"in each pass the same keys in the same order, mean |diff| < {tolerance} and the worst "
        f"frame's mean |diff| < {frame_tolerance} in normalized units (JPEG decoders round "
        "differently; one 8-bit level is about 0.017)"
    )
    if "dali-gpu" in kinds and not plan.cuda:
        return not_run("pixel_parity", title, no_cuda_reason(plan.device), criterion)
    same_draws = all(k in DALI_KINDS for k in kinds)
    results, skipped = [], []
    for way in parity_passes(plan.image_size):
        if way.augment is not None and not same_draws:
            skipped.append(f"{way.name} (the two kinds draw their own random angles)")
            continue
        (keys_a, a), (keys_b, b) = (
            first_batches(
                shards,
                kind,
                plan.device if kind == "dali-gpu" else torch.device("cpu"),
                plan,
                batches,
                way,
            )
            for kind in kinds
        )
        result = compare_frames(keys_a, a, keys_b, b)
        result.update(name=way.name, setup=way.describe())
        result["problem"] = judge(result, tolerance, frame_tolerance)
        results.append(result)
    problems = [f"{r['name']}: {r['problem']}" for r in results if r["problem"]]
    compared = [r for r in results if not r["keys_differ"]]
    details: dict = {
        "passes": results,
        "skipped": skipped,
        "tolerance": tolerance,
        "frame_tolerance": frame_tolerance,
    }
    body = [
        f"- val frames, no shuffle, float32; batch {plan.small_batch}, {batches} batches per "
        "pass; |diff| in normalized units.",
        "",
        "| pass | frames | mean abs diff | max abs diff | worst frame (its mean abs diff) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r["keys_differ"]:
            body.append(f"| {r['setup']} | {r['frames']} | keys differ | | |")
            continue
        body.append(
            f"| {r['setup']} | {r['frames']} | {r['mean_abs_diff']:.4f} | "
            f"{r['max_abs_diff']:.4f} | `{r['worst_frame']}` ({r['worst_frame_mean']:.4f}) |"
        )
    body += [f"- skipped: {s}" for s in skipped]
    if compared:
        worst = max(compared, key=lambda r: r["worst_frame_mean"])
        details.update(
            frames=compared[0]["frames"],
            mean_abs_diff=max(r["mean_abs_diff"] for r in compared),
            max_abs_diff=max(r["max_abs_diff"] for r in compared),
            worst_frame=worst["worst_frame"],
            worst_frame_mean=worst["worst_frame_mean"],
        )
        summary = (
            f"{len(results)} passes x {details['frames']} frames: mean |diff| up to "
            f"{details['mean_abs_diff']:.4f}, worst frame {worst['worst_frame']} "
            f"({worst['name']}) {worst['worst_frame_mean']:.4f}, max {details['max_abs_diff']:.4f}"
        )
    else:
        summary = "no pass compared the same frames"
    if problems:
        summary = "; ".join(problems)
    return Check(
        "pixel_parity",
        title,
        FAILED if problems else PASSED,
        summary,
        criterion,
        details,
        body,
    )
