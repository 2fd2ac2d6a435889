"""Check 5: pixel parity, the same val frames from two loader kinds."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from affectfast.doctor.check import FAILED, PASSED, Check, no_cuda_reason, not_run
from affectfast.doctor.plan import Plan
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

PARITY_MEAN_TOLERANCE = 0.02  # mean |gpu - cpu| in normalized units (1/255 of a level is ~0.017)


def first_batches(
    shards: Path, kind: str, device: torch.device, plan: Plan, batches: int
) -> tuple[list[str], torch.Tensor]:
    """Keys and float32 CPU images of the first ``batches`` val batches of one loader kind."""
    loader = build_loader(
        kind,
        shards,
        "val",
        TASKS,
        plan.small_batch,
        image_size=plan.image_size,
        augment=None,
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


def check_pixel_parity(
    shards: Path,
    plan: Plan,
    kinds: tuple[str, str] = ("dali-gpu", "dali-cpu"),
    batches: int = 4,
    tolerance: float = PARITY_MEAN_TOLERANCE,
) -> Check:
    """The same val frames (no augmentation, same order) from two loader kinds: mean/max |diff|."""
    title = f"pixel parity {kinds[0]} vs {kinds[1]}"
    criterion = (
        f"same keys in the same order, and mean |diff| < {tolerance} in normalized units "
        "(JPEG decoders round differently; one 8-bit level is about 0.017)"
    )
    if "dali-gpu" in kinds and not plan.cuda:
        return not_run("pixel_parity", title, no_cuda_reason(plan.device), criterion)
    (keys_a, a), (keys_b, b) = (
        first_batches(
            shards, k, plan.device if k == "dali-gpu" else torch.device("cpu"), plan, batches
        )
        for k in kinds
    )
    if keys_a != keys_b:
        return Check(
            "pixel_parity",
            title,
            FAILED,
            f"the two loaders gave different frames or orders ({len(keys_a)} vs {len(keys_b)} "
            "keys)",
            criterion,
            {"keys_a": keys_a[:8], "keys_b": keys_b[:8]},
        )
    diff = (a - b).abs()
    mean, worst = float(diff.mean()), float(diff.max())
    per_frame = diff.flatten(1).mean(1)
    details = {
        "frames": len(keys_a),
        "mean_abs_diff": mean,
        "max_abs_diff": worst,
        "worst_frame": keys_a[int(per_frame.argmax())],
        "worst_frame_mean": float(per_frame.max()),
        "tolerance": tolerance,
    }
    ok = mean < tolerance
    body = [
        f"- {len(keys_a)} val frames, {plan.image_size} px, keys identical and in the same order.",
        f"- mean |diff| {mean:.4f}, max |diff| {worst:.4f} (normalized units); the frame that "
        f"differs most is `{details['worst_frame']}` (mean {details['worst_frame_mean']:.4f}).",
    ]
    return Check(
        "pixel_parity",
        title,
        PASSED if ok else FAILED,
        f"{len(keys_a)} frames: mean |diff| {mean:.4f} (< {tolerance}: "
        f"{'yes' if ok else 'no'}), max {worst:.4f}",
        criterion,
        details,
        body,
    )
