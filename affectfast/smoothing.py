"""Per-video post-processing for ABAW submissions: fill every frame, then smooth along time.

An ABAW submission has a line for every frame of every video, faces or not (docs/design.md §6), while a
model only sees the frames that have a face image. The order is always the same:

1. :func:`complete_video`: give every frame 1..total a prediction; frames without one take it from
   their nearest predicted neighbours (linear interpolation for VA values, the nearest frame for
   EXPR and AU probabilities).
2. :func:`smooth`: a centred moving average over frames, one window per task, within one video.
3. Score (on val) or write (on test).

:func:`tune_windows` picks each task's window on val with the project's metrics, and
:func:`save_windows` / :func:`load_windows` keep the choice beside the checkpoint it was tuned for
(``best.pt`` -> ``best.smoothing.json``, bound to the checkpoint's bytes: :mod:`affectfast.tuned`).
Every function here works on numpy arrays of one video at a time and costs O(frames): a video has
up to about 50k frames (never more than :data:`MAX_FRAMES`) and the test set has hundreds of videos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from affectfast.affwild2 import FRAME_DIGITS
from affectfast.errors import DataError
from affectfast.metrics import Predictions, compute_metrics
from affectfast.safe_files import excerpt
from affectfast.tasks import TASKS
from affectfast.tuned import SMOOTHING, Fingerprint, read_tuned, write_tuned

# How frames without a prediction get one: VA values vary continuously, so interpolate; EXPR and
# AU probabilities are copied from the nearest frame (an interpolated class distribution between two
# confident frames would be an unconfident one that no frame produced).
INTERPOLATION: dict[str, str] = {"va": "linear", "expr": "nearest", "au": "nearest"}
# Candidate windows, in frames (Aff-Wild2 videos run at 24-60 fps, so up to about 1-2 s).
WINDOW_GRID: tuple[int, ...] = (1, 3, 5, 9, 15, 25, 41)
# The metric each task's window is chosen by: keys of metrics.compute_metrics.
TASK_METRIC: dict[str, str] = {"va": "ccc_mean", "expr": "f1_expr", "au": "f1_au"}
# Frame names have five digits, so no video has more frames than this: the cap on a frame count
# and on a window (a larger one would only average the same frames), checked before any work.
MAX_FRAMES = 10**FRAME_DIGITS - 1
ORDER = "complete every frame, then smooth, then score or write"


# --- completion -----------------------------------------------------------------------------------
def complete_video(frames: np.ndarray, values: np.ndarray, total: int, kind: str) -> np.ndarray:
    """Predictions for every frame 1..``total`` of a video from those of the ``frames`` that have one.

    ``frames``: strictly increasing 1-based frame numbers within 1..total, one per row of
    ``values`` (frames × ... ). ``kind="linear"`` interpolates each column between the two
    neighbouring predicted frames (float64); ``"nearest"`` copies the row of the nearest predicted
    frame, the earlier one on a tie (dtype kept). Frames before the first or after the last
    predicted frame take that frame's values under both kinds. Returns shape (total, ...).
    """
    frames, values = np.asarray(frames), np.asarray(values)
    if not 1 <= total <= MAX_FRAMES:
        raise ValueError(f"total must be in 1..{MAX_FRAMES} frames; got {total}")
    _check_frames(frames, values, total)
    targets = np.arange(1, total + 1)
    if kind == "nearest":
        return values[_nearest_rows(frames, targets)]
    if kind != "linear":
        raise ValueError(f"kind must be 'linear' or 'nearest'; got {kind!r}")
    columns = values.reshape(len(frames), -1).astype(np.float64)
    # A loop over columns (2 for VA), not frames: np.interp is vectorised over the frames and holds
    # the edge values outside the predicted range.
    filled = np.stack([np.interp(targets, frames, c) for c in columns.T], axis=1)
    return filled.reshape((total,) + values.shape[1:])


def _check_frames(frames: np.ndarray, values: np.ndarray, total: int) -> None:
    """Refuse frame numbers that are not 1-D, sorted, unique, within 1..total and one per row."""
    if frames.ndim != 1 or len(frames) != len(values):
        raise ValueError(
            f"frames must be 1-D with one number per row of values; got frames {frames.shape}, "
            f"values {values.shape}"
        )
    if len(frames) == 0:
        raise ValueError("no predicted frame: nothing to complete the video from")
    if not np.issubdtype(frames.dtype, np.integer):
        raise ValueError(f"frames must be integers; got {frames.dtype}")
    if (np.diff(frames) <= 0).any():
        raise ValueError("frames must be strictly increasing (sorted, no repeats)")
    if frames[0] < 1 or frames[-1] > total:
        raise ValueError(f"frames must lie in 1..{total}; got {frames[0]}..{frames[-1]}")


def _nearest_rows(frames: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Row of ``frames`` nearest to each target; ties go to the earlier frame."""
    after = np.searchsorted(frames, targets)  # first predicted frame >= target
    before = np.maximum(after - 1, 0)
    after = np.minimum(after, len(frames) - 1)
    # The later frame wins only when strictly closer; outside the range both indices coincide.
    take_after = (frames[after] - targets) < (targets - frames[before])
    return np.where(take_after, after, before)


# --- smoothing ------------------------------------------------------------------------------------
def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of ``window`` frames (odd) along axis 0 of one video's values.

    Near the ends the average is over the frames that exist inside the window, so an edge frame is
    not pulled towards zero the way zero padding would. ``window=1`` returns the values unchanged
    (as float64). Built on a cumulative sum: O(frames) whatever the window.
    """
    _check_window(window)
    values = np.asarray(values, dtype=np.float64)
    if window == 1 or len(values) == 0:
        return values.copy()
    if not np.isfinite(values).all():
        raise ValueError("values must be finite: one NaN would spread through the running sum")
    n, half = len(values), window // 2
    sums = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])
    index = np.arange(n)
    low, high = np.maximum(index - half, 0), np.minimum(index + half + 1, n)
    counts = (high - low).reshape((n,) + (1,) * (values.ndim - 1))
    return (sums[high] - sums[low]) / counts


def _check_window(window) -> None:
    """A window is an odd int in 1..MAX_FRAMES, so that it is centred on its frame."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive odd integer; got {excerpt(window)}")
    if window > MAX_FRAMES:
        raise ValueError(f"window must be at most {MAX_FRAMES} frames (any video); got {window}")
    if window % 2 == 0:
        raise ValueError(f"window must be odd (centred on its frame); got {window}")


def complete_and_smooth(
    task: str, frames: np.ndarray, values: np.ndarray, total: int, window: int
) -> np.ndarray:
    """One video's submission values for ``task``: :func:`complete_video`, then :func:`smooth`.

    ``values``: VA values, EXPR probabilities (softmax of the logits) or AU probabilities.
    """
    return smooth(complete_video(frames, values, total, INTERPOLATION[task]), window)


# --- tuning on val --------------------------------------------------------------------------------
def tune_windows(
    outputs: dict[str, list[np.ndarray]],
    labels: dict[str, list[np.ndarray]],
    masks: dict[str, list[np.ndarray]],
    grid: tuple[int, ...] = WINDOW_GRID,
    au_thresholds: np.ndarray | None = None,
) -> tuple[dict[str, int], dict[str, dict]]:
    """Choose each task's window from ``grid`` by its ABAW metric on val.

    Per task, one array per video, every frame of it and already completed
    (:func:`complete_video`): ``outputs`` VA values (T×2), EXPR probabilities (T×8), AU
    probabilities (T×12); ``labels`` and ``masks`` as in :class:`affectfast.metrics.Predictions`.
    Each video is smoothed on its own, then all frames with a valid label are scored together with
    :func:`affectfast.metrics.compute_metrics` (AU at 0.5, or at ``au_thresholds`` when given).
    Window 1 is always tried: its score is the raw one. A tie goes to the smaller window. A task
    without a single valid label has nothing to be tuned on: it is left out of both results.

    Returns ``(windows, scores)``: ``windows[task]`` the chosen window; ``scores[task]`` a dict with
    ``metric`` (its name), ``raw`` (window 1), ``smoothed`` (the chosen window), ``grid`` and
    ``grid_scores`` (every window tried, in order).
    """
    for window in grid:
        _check_window(window)
    candidates = sorted({int(w) for w in grid} | {1})
    windows, scores = {}, {}
    for task in (t for t in TASKS if t in outputs):
        _check_videos(task, outputs, labels, masks)
        label, mask = np.concatenate(labels[task]), np.concatenate(masks[task]).astype(bool)
        if not mask.any():  # absent from this split: no score to choose by
            continue
        tried = [
            _score(task, [smooth(o, w) for o in outputs[task]], label, mask, au_thresholds)
            for w in candidates
        ]
        best = int(np.argmax(tried))  # the first maximum: the smallest window among equals
        windows[task] = candidates[best]
        scores[task] = {
            "metric": _metric_name(task, au_thresholds),
            "raw": tried[0],
            "smoothed": tried[best],
            "grid": candidates,
            "grid_scores": tried,
        }
    return windows, scores


def _check_videos(task: str, outputs: dict, labels: dict, masks: dict) -> None:
    """Outputs, labels and masks of ``task`` hold the same videos with the same frame counts."""
    if task not in labels or task not in masks:
        raise ValueError(f"{task}: outputs given without labels and masks")
    lengths = [[len(a) for a in group[task]] for group in (outputs, labels, masks)]
    if not lengths[0] == lengths[1] == lengths[2]:
        raise ValueError(f"{task}: outputs, labels and masks differ in videos or frames per video")


def _metric_name(task: str, au_thresholds: np.ndarray | None) -> str:
    return "f1_au_tuned" if task == "au" and au_thresholds is not None else TASK_METRIC[task]


def _score(
    task: str,
    outputs: list[np.ndarray],
    label: np.ndarray,
    mask: np.ndarray,
    au_thresholds: np.ndarray | None,
) -> float:
    """The task's metric over all videos' frames together, as ABAW scores a whole set."""
    preds = Predictions(
        outputs={task: np.concatenate(outputs)}, labels={task: label}, masks={task: mask}
    )
    metrics = compute_metrics(preds, (task,), au_thresholds if task == "au" else None)
    return float(metrics[_metric_name(task, au_thresholds)])


# --- the choice beside a checkpoint ---------------------------------------------------------------
def save_windows(
    path: str | Path,
    fingerprint: Fingerprint,
    windows: dict[str, int],
    scores: dict[str, dict],
    absent: tuple[str, ...] = (),
) -> Path:
    """Write ``windows`` and ``scores`` (as :func:`tune_windows` returns them), tuned for the
    checkpoint of ``fingerprint``, to a JSON file (``absent``: tasks the split had no label for).

    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    body = {
        "order": ORDER,
        "windows": {task: int(w) for task, w in windows.items()},
        "scores": scores,
        "absent": list(absent),
    }
    _check_body(path, body)
    return write_tuned(path, SMOOTHING, fingerprint, body)


def load_windows(
    path: str | Path, fingerprint: Fingerprint
) -> tuple[dict[str, int], dict[str, dict], tuple[str, ...]]:
    """Read what :func:`save_windows` wrote for ``fingerprint``'s checkpoint: ``(windows, scores,
    absent)``; a DataError naming the file for anything else (a FIFO, a file too large, another
    checkpoint's windows, a window beyond :data:`MAX_FRAMES`)."""
    path = Path(path)
    document = read_tuned(path, SMOOTHING, fingerprint)
    _check_body(path, document)
    return document["windows"], document["scores"], tuple(document["absent"])


def _check_body(path: Path, document: dict) -> None:
    """Refuse anything but the format save_windows writes, naming the field at fault."""
    windows, scores, absent = (document.get(k) for k in ("windows", "scores", "absent"))
    if not isinstance(windows, dict) or not set(windows) <= set(TASKS):
        raise DataError(path, f"'windows' must map some of {', '.join(TASKS)} to a window")
    for task, window in windows.items():
        try:
            _check_window(window)
        except ValueError as error:
            raise DataError(path, f"windows.{task}: {error}") from None
    if not isinstance(scores, dict) or set(scores) != set(windows):
        raise DataError(path, "'scores' must have an entry for each task in 'windows'")
    for task, entry in scores.items():
        _check_scores(path, task, entry)
    if (
        not isinstance(absent, list)
        or not all(isinstance(t, str) for t in absent)
        or not set(absent) <= set(TASKS) - set(windows)
        or not windows | dict.fromkeys(absent)
    ):
        raise DataError(
            path,
            f"'absent' must list the tasks without a window (got {excerpt(absent)}), and a "
            "task must have a window or be absent",
        )


def _check_scores(path: Path, task: str, entry) -> None:
    """One task's scores: the metric's name, the raw and smoothed values, the grid tried."""
    number = (int, float)
    fine = (
        isinstance(entry, dict)
        and isinstance(entry.get("metric"), str)
        and isinstance(entry.get("raw"), number)
        and isinstance(entry.get("smoothed"), number)
        and isinstance(entry.get("grid"), list)
        and isinstance(entry.get("grid_scores"), list)
        and len(entry["grid"]) == len(entry["grid_scores"])
        and all(isinstance(s, number) for s in entry["grid_scores"])
    )
    if not fine:
        raise DataError(
            path,
            f"scores.{task} must hold metric (text), raw and smoothed (numbers), and grid and "
            "grid_scores (lists of equal length)",
        )
