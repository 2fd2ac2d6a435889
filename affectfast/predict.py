"""Evaluate and predict with a checkpoint: ABAW metric tables and complete ABAW submissions.

``evaluate(EvalConfig)`` scores a checkpoint on a labelled split with the same validation pass
training runs (``train.predict_split`` + ``train.score``); with ``tune_smoothing`` it also chooses a
smoothing window per task on that split, with ``tune_au_thresholds`` a threshold per AU, and saves
each beside the checkpoint, bound to its bytes (``best.smoothing.json``, ``best.au_thresholds.json``:
:mod:`affectfast.tuned`). ``predict(EvalConfig, out)`` writes one file per video and task in the
challenge layout, with a line for *every* frame of the video, faces or not (docs/design.md §6). The
checkpoint carries the run's config (tasks, image size, precision), so nothing else is needed.

Per video and task, always in this order (``docs/smoothing.md``):

1. the model's outputs on the frames that have an image (VA values, EXPR softmax probabilities,
   AU probabilities);
2. complete: every frame 1..N gets a row (``smoothing.complete_video``: linear for VA, the nearest
   frame for EXPR and AU), N the video's frame count;
3. smooth (``--smooth``: the windows tuned on val), then score (evaluate) or write (predict):
   VA clipped to [-1, 1], EXPR the most probable class, AU 1 above the per-AU thresholds
   (tuned by evaluate, else the checkpoint's, else 0.5; the summary names which).

N comes from a ``--frame-counts`` CSV where it names the video, else the manifest (the video's
annotation lines), else the last frame with an image; the summary says which for each video. A
given N is authoritative: images after frame N are left out of the files and counted per video.

predict checks everything it can before the model runs (:func:`plan_submission`), then writes
through :mod:`affectfast.prediction_folder`: every file is written into a hidden staging folder,
checked with :func:`check_submission`, and only then swapped in place of ``out``, which must be
missing, empty or a prediction folder holding only what its record lists. The temporal stage's
per-frame outputs take the same path: a plan, then :func:`write_submission`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from affectfast.affwild2 import FRAME_DIGITS, is_video_name
from affectfast.config import EvalConfig, TrainConfig
from affectfast.dist import setup_distributed, teardown_distributed
from affectfast.errors import DataError
from affectfast.metrics import Predictions
from affectfast.model import AffectNet
from affectfast.prediction_folder import PredictionFolder, check_out, write_folder
from affectfast.rundir import is_temporal, load_checkpoint
from affectfast.safe_files import excerpt, read_text
from affectfast.shards import MANIFEST, load_manifest, split_shards
from affectfast.smoothing import (
    INTERPOLATION,
    MAX_FRAMES,
    WINDOW_GRID,
    complete_and_smooth,
    complete_video,
    load_windows,
    save_windows,
    tune_windows,
)
from affectfast.tasks import (
    CHALLENGE_DIRS,
    EXPR_NAMES,
    HEADERS,
    NUM_AU,
    NUM_EXPR,
    TASKS,
    split_member,
)
from affectfast.temporal import temporal_predictions
from affectfast.train import (
    build_autocast,
    build_eval_loader,
    predict_split,
    resolve_device,
    score,
)
from affectfast.tuned import (
    AU_THRESHOLDS,
    SMOOTHING,
    Fingerprint,
    load_au_thresholds,
    save_au_thresholds,
    tuned_path,
)

FRAME_COUNTS_HEADER = ("video", "frames")
FRAME_COUNTS_LIMIT = 16 << 20  # bytes: a line per video, ~30 bytes each
INDEX_LINE_LIMIT = 512  # bytes per sample line of a DALI index (five components and a key)
# Where a video's frame count came from, as the summary names it.
FROM_CSV, FROM_ANNOTATIONS, FROM_LAST_IMAGE = "--frame-counts", "annotations", "last image"
HALF = 0.5  # the AU threshold without tuned ones
# bytes: a header and a line per frame (an AU line is 24 bytes, a VA line at most 20)
PREDICTION_LIMIT = 256 + 32 * MAX_FRAMES


def _load_for_eval(config: EvalConfig, checkpoint: dict | None = None):
    """(model, run config resolved for this machine, dist info, autocast, checkpoint)."""
    checkpoint = checkpoint or load_checkpoint(config.checkpoint)
    saved = TrainConfig.from_dict(checkpoint["config"])
    # The saved precision is concrete (bf16, fp16 or off): evaluate as trained; only the loader follows the machine.
    run = dataclasses.replace(
        saved, shards=config.shards, loader=config.loader, num_threads=config.num_threads
    )
    run, use_cuda = resolve_device(run)
    info = setup_distributed(use_cuda)
    model = AffectNet(run.tasks)
    model.load_state_dict(checkpoint["model"])
    model = model.to(
        info.device,
        memory_format=torch.channels_last if run.channels_last else torch.preserve_format,
    )
    return model, run, info, build_autocast(info.device, run.amp), checkpoint


def _predict_split(
    config: EvalConfig, checkpoint: dict | None = None
) -> tuple[Predictions | None, TrainConfig, bool, dict]:
    """Run the checkpoint over ``config.split``: (predictions of every rank on the main rank, None
    on the others; run config, whether this is the main rank, checkpoint)."""
    model, run, info, autocast, checkpoint = _load_for_eval(config, checkpoint)
    try:
        loader = build_eval_loader(run, config.shards, config.split, info, config.batch_size)
        return predict_split(model, loader, autocast, info), run, info.is_main, checkpoint
    finally:
        teardown_distributed()


def _predictions(
    config: EvalConfig, checkpoint: dict | None = None
) -> tuple[Predictions | None, tuple[str, ...], bool, dict]:
    """(predictions of ``config.split`` on the main rank, None on the others; the checkpoint's
    tasks, whether this is the main rank, the checkpoint) for a frame or a temporal checkpoint.

    A temporal one (``train-temporal``) predicts from features (``config.features``, else
    extracted on the fly), in one process: its head is small next to the frame model."""
    checkpoint = checkpoint or load_checkpoint(config.checkpoint, temporal_ok=True)
    if is_temporal(checkpoint):
        preds, tasks = temporal_predictions(config, checkpoint)
        return preds, tasks, True, checkpoint
    if config.features is not None:
        raise DataError(
            config.checkpoint,
            "a frame checkpoint reads SHARDS; --features is for a temporal checkpoint "
            "(train-temporal)",
        )
    preds, run, is_main, checkpoint = _predict_split(config, checkpoint)
    return preds, run.tasks, is_main, checkpoint


# --- AU thresholds --------------------------------------------------------------------------------


class AuThresholds(NamedTuple):
    """The per-AU thresholds an AU file is written at, and where they came from (in words)."""

    values: np.ndarray  # 12 floats in (0, 1)
    source: str
    tuned: bool = True  # False: the 0.5 of every AU, nothing tuned


def au_thresholds_for(
    checkpoint_path: Path, checkpoint: dict, fingerprint: Fingerprint
) -> AuThresholds:
    """The thresholds predict writes AU at: tuned by ``evaluate --tune-au-thresholds`` for this
    checkpoint (its ``.au_thresholds.json``), else tuned on val during training (in the
    checkpoint), else 0.5. A file tuned for other bytes of this checkpoint is a DataError."""
    path = tuned_path(checkpoint_path, AU_THRESHOLDS)
    if path.exists() or path.is_symlink():
        values, split = load_au_thresholds(path, fingerprint)
        return AuThresholds(values, f"tuned on {split} by evaluate ({path})")
    saved = checkpoint.get("au_thresholds")
    if saved is not None:
        fine = (
            isinstance(saved, (list, tuple))
            and len(saved) == NUM_AU
            and all(isinstance(v, float) and 0 < v < 1 for v in saved)
        )
        if not fine:
            raise DataError(checkpoint_path, f"au_thresholds: expected {NUM_AU} numbers in (0, 1)")
        return AuThresholds(np.asarray(saved, dtype=np.float64), "tuned on val during training")
    return AuThresholds(
        np.full(NUM_AU, HALF),
        f"{HALF} (none tuned: evaluate --tune-au-thresholds tunes them)",
        tuned=False,
    )


# --- evaluate ------------------------------------------------------------------------------------


def evaluate(config: EvalConfig) -> dict | None:
    """The checkpoint's metrics on ``config.split`` of ``config.shards`` (all ranks gathered) on
    the main rank; None on the other ranks of a torchrun launch.

    With ``tune_au_thresholds`` the tuned thresholds are saved beside the checkpoint
    (``metrics["au_thresholds_path"]``; nothing when the split has no AU label). With
    ``tune_smoothing`` also ``metrics["smoothing"]`` = ``{"windows", "scores", "absent",
    "path"}``: each task's window chosen on the split (raw and smoothed scores in ``scores``;
    ``absent`` the tasks the split has no label for), saved beside the checkpoint.
    """
    if config.split == "test":
        raise DataError(
            config.shards / MANIFEST,
            "the test split has no labels, so nothing to score: evaluate train or val, and "
            "write test predictions with `affectfast predict --split test`",
        )
    tuning = config.tune_smoothing or config.tune_au_thresholds
    fingerprint = Fingerprint.of(config.checkpoint) if tuning else None
    counts = load_manifest(config.shards).get("frame_counts", {}) if config.tune_smoothing else {}
    preds, tasks, is_main, checkpoint = _predictions(config)
    if not is_main:  # the main rank holds every rank's predictions, and reports
        return None
    metrics = score(preds, tasks, config.tune_au_thresholds)
    if "au_thresholds" in metrics:
        path = tuned_path(config.checkpoint, AU_THRESHOLDS)
        scores = {"f1_au": metrics["f1_au"], "f1_au_tuned": metrics["f1_au_tuned"]}
        save_au_thresholds(path, fingerprint, metrics["au_thresholds"], config.split, scores)
        metrics["au_thresholds_path"] = str(path)
    if config.tune_smoothing:
        thresholds = None  # AU scored at 0.5, as predict writes it without tuned thresholds
        if "au_thresholds" in metrics:
            thresholds = np.asarray(metrics["au_thresholds"])
        elif "au" in tasks:
            found = au_thresholds_for(config.checkpoint, checkpoint, fingerprint)
            thresholds = found.values if found.tuned else None
        windows, scores = tune_smoothing(preds, tasks, counts, thresholds, source=config.shards)
        absent = tuple(t for t in tasks if t not in windows)
        path = tuned_path(config.checkpoint, SMOOTHING)
        save_windows(path, fingerprint, windows, scores, absent)
        metrics["smoothing"] = {
            "windows": windows,
            "scores": scores,
            "absent": list(absent),
            "path": str(path),
        }
    return metrics


def tune_smoothing(
    preds: Predictions,
    tasks: tuple[str, ...],
    frame_counts: dict[str, int],
    au_thresholds: np.ndarray | None = None,
    *,
    grid: tuple[int, ...] = WINDOW_GRID,
    source: Path = Path("."),
) -> tuple[dict[str, int], dict[str, dict]]:
    """``smoothing.tune_windows`` on every video of ``preds`` completed to its frame count.

    Outputs are completed over frames 1..N (``frame_counts``, checked by ``shards.check_manifest``,
    else the last predicted frame); the frames without a prediction have no label in the shards,
    so they are masked out of the score, and predicted frames after N are left out as predict
    leaves them out. AU is scored at ``au_thresholds`` where given (those predict will write
    at). A task without a valid label is absent from the result. ``grid``: the windows tried;
    ``source`` (the shards) is named in the error for a malformed key.
    """
    outputs: dict[str, list] = {t: [] for t in tasks}
    labels: dict[str, list] = {t: [] for t in tasks}
    masks: dict[str, list] = {t: [] for t in tasks}
    for video, frames, rows in video_rows(preds.keys, source):
        total = frame_counts.get(video, int(frames[-1]))
        kept = frames <= total
        frames, rows = frames[kept], np.arange(rows.start, rows.stop)[kept]
        if not len(frames):  # every image after frame N: nothing of it is scored
            continue
        for task in tasks:
            values = task_values(task, preds.outputs[task][rows])
            outputs[task].append(complete_video(frames, values, total, INTERPOLATION[task]))
            label = np.zeros((total, *preds.labels[task].shape[1:]), preds.labels[task].dtype)
            label[frames - 1] = preds.labels[task][rows]
            mask = np.zeros(total, dtype=bool)
            mask[frames - 1] = preds.masks[task][rows]
            labels[task].append(label)
            masks[task].append(mask)
    thresholds = None if au_thresholds is None else np.asarray(au_thresholds, dtype=np.float64)
    return tune_windows(outputs, labels, masks, grid, au_thresholds=thresholds)


def format_smoothing(smoothing: dict) -> str:
    """The raw and smoothed score of each task, side by side, and where the windows were saved."""
    lines = [
        "smoothing (every frame completed, then a centred moving average per video)",
        f"{'task':<6}{'metric':<14}{'raw':>8}{'smoothed':>10}{'window':>8}",
    ]
    for task, entry in smoothing["scores"].items():
        lines.append(
            f"{task:<6}{entry['metric']:<14}{entry['raw']:>8.4f}{entry['smoothed']:>10.4f}"
            f"{smoothing['windows'][task]:>8}"
        )
    for task in smoothing.get("absent", ()):
        lines.append(f"{task:<6}absent: no valid label in this split, not smoothed (window 1)")
    lines.append(f"saved {smoothing['path']}")
    return "\n".join(lines)


# --- predict -------------------------------------------------------------------------------------


class FrameCount(NamedTuple):
    """A video's frame count N (the lines of each of its files) and how it was found."""

    frames: int  # N
    source: str  # FROM_CSV, FROM_ANNOTATIONS or FROM_LAST_IMAGE
    last_image: int  # the last frame with an image
    left_out: int = 0  # images after frame N: in the shards, not in the submission


@dataclass
class SubmissionPlan:
    """What :func:`plan_submission` checked before inference: where, what and how to write."""

    out: PredictionFolder
    split: str
    expected: dict[str, dict[str, int]]  # task -> video -> N: the files to write
    frames: dict[str, FrameCount]
    windows: dict[str, int] | None  # per task, None without smoothing
    untuned: tuple[str, ...]  # tasks smoothed with window 1: the val split had no label for them
    thresholds: AuThresholds
    skipped: list[str]  # why a task gets no file, one line each
    inputs: dict  # what the record says about the inputs (checkpoint, shards, files)


@dataclass
class Submission:
    """What :func:`predict` wrote: the files, and per video its frame count and their source."""

    out: Path
    split: str
    files: list[Path] = field(default_factory=list)
    frames: dict[str, FrameCount] = field(default_factory=dict)
    windows: dict[str, int] | None = None  # smoothing windows applied, None without --smooth
    skipped: list[str] = field(default_factory=list)  # why a task got no file, one line each
    notes: list[str] = field(default_factory=list)  # smoothing and thresholds used, in words

    def summary(self) -> str:
        """What was written, how, and for each video its frame count and where it came from."""
        width = max([len("video"), *map(len, self.frames)])
        left_out = {v: c for v, c in self.frames.items() if c.left_out}
        lines = [
            f"wrote {len(self.files)} prediction files under {self.out} (split {self.split}), "
            "every frame 1..N of each video, format checked",
            *self.notes,
            *self.skipped,
        ]
        if left_out:
            lines.append(
                f"{len(left_out)} videos have images past their frame count N: those frames "
                f"are left out ({sum(c.left_out for c in left_out.values())} images; the count "
                "is authoritative)"
            )
        lines.append(
            f"{'video':<{width}}  {'N':>7}  {'N from':<16}{'last image':>10}{'left out':>10}"
        )
        for video, count in self.frames.items():
            lines.append(
                f"{video:<{width}}  {count.frames:>7}  {count.source:<16}{count.last_image:>10}"
                f"{count.left_out:>10}"
            )
        return "\n".join(lines)


def predict(config: EvalConfig, out: str | Path) -> Submission:
    """Write a complete ABAW submission for ``config.split``: ``out/<Challenge>/<video>.txt``.

    Train and val: a file per trained task and video of the split. Test: a file per trained task
    and video that task's test list names (the manifest holds the lists). Every file has the task's
    header and one line per frame 1..N (see the module docstring). Bad input is a DataError before
    the model runs (:func:`plan_submission`), and nothing is written.
    """
    fingerprint = Fingerprint.of(config.checkpoint)
    checkpoint = load_checkpoint(config.checkpoint, temporal_ok=True)
    plan = plan_submission(config, out, checkpoint, fingerprint)
    preds, _, is_main, _ = _predictions(config, checkpoint)
    if not is_main:
        return Submission(plan.out.given, plan.split, frames=plan.frames, windows=plan.windows)
    return write_submission(plan, preds, config.shards)


def plan_submission(
    config: EvalConfig, out: str | Path, checkpoint: dict, fingerprint: Fingerprint
) -> SubmissionPlan:
    """Everything predict checks before inference, as a plan for :func:`write_submission`.

    A DataError for: ``out`` not a folder predict may replace (or holding an input), a split the
    pack lacks, a frame-count CSV that is malformed, counts beyond :data:`MAX_FRAMES` or misses a
    video, ``smooth`` without windows tuned for this checkpoint, thresholds tuned for other
    bytes of it.
    """
    inputs = [(config.checkpoint, "checkpoint"), (config.shards, "shards")]
    if config.frame_counts is not None:
        inputs.append((config.frame_counts, "frame-count CSV"))
    if config.features is not None:
        inputs.append((config.features, "feature folder"))
    folder = check_out(out, inputs)
    manifest = load_manifest(config.shards)
    wanted = _videos_wanted(manifest, config)
    images = image_frames(config.shards, config.split)
    unseen = sorted(set().union(*(wanted or {}).values()) - set(images))
    if unseen:  # every image of it was bad and skipped at pack time, say
        raise DataError(
            config.shards / MANIFEST,
            f"video {unseen[0]} is in a test list but has no frame in the test shards: "
            "nothing to predict it from",
        )
    given = read_frame_counts(config.frame_counts) if config.frame_counts else None
    frames = resolve_frame_counts(
        images, manifest.get("frame_counts", {}), given, config.frame_counts
    )
    trained = tuple(checkpoint["config"]["tasks"])
    tasks = [t for t in trained if wanted is None or t in wanted]
    if not tasks:
        raise DataError(
            config.shards / MANIFEST,
            f"the checkpoint predicts {','.join(trained)} but the test split lists videos for "
            f"{','.join(wanted)} only: nothing to write",
        )
    windows, untuned, smoothing_path = None, (), None
    if config.smooth:
        smoothing_path = tuned_path(config.checkpoint, SMOOTHING)
        windows, untuned = _smoothing_windows(smoothing_path, fingerprint, trained)
    thresholds = (
        au_thresholds_for(config.checkpoint, checkpoint, fingerprint)
        if "au" in tasks
        else AuThresholds(np.full(NUM_AU, HALF), "none: no AU files", tuned=False)
    )
    skipped = [f"no {t} files: the test split has no {t} list" for t in trained if t not in tasks]
    skipped += [
        f"no {t} files: the checkpoint has no {t} head" for t in wanted or () if t not in trained
    ]
    expected = {
        task: {v: frames[v].frames for v in sorted(frames) if wanted is None or v in wanted[task]}
        for task in tasks
    }
    record_inputs = {
        "checkpoint": {"path": str(config.checkpoint), **fingerprint.to_dict()},
        "shards": str(config.shards),
        "features": None if config.features is None else str(config.features),
        "split": config.split,
        "smoothing": None
        if windows is None
        else {"windows": windows, "untuned": list(untuned), "file": str(smoothing_path)},
        "au_thresholds": {"values": thresholds.values.tolist(), "source": thresholds.source},
        "frame_counts": {v: c._asdict() for v, c in frames.items()},
    }
    return SubmissionPlan(
        folder, config.split, expected, frames, windows, untuned, thresholds, skipped, record_inputs
    )


def write_submission(plan: SubmissionPlan, preds: Predictions, source: Path) -> Submission:
    """Complete, smooth and write ``preds`` as ``plan`` says, check every file, and put the
    folder in place of ``plan.out`` (see :mod:`affectfast.prediction_folder`). ``source`` (the
    shards) is named in the error for a malformed key."""
    submission = Submission(
        plan.out.given, plan.split, frames=plan.frames, windows=plan.windows, skipped=plan.skipped
    )
    submission.notes = _notes(plan)

    def fill(staging: Path) -> dict:
        paths = write_files(
            staging, preds, plan.expected, plan.windows, plan.thresholds.values, source
        )
        check_submission(staging, plan.expected)
        submission.files = [plan.out.given / p.relative_to(staging) for p in paths]
        return plan.inputs

    write_folder(plan.out, fill)
    return submission


def _notes(plan: SubmissionPlan) -> list[str]:
    """The smoothing and AU thresholds a submission was written with, in words."""
    if plan.windows is None:
        smoothing = "smoothing: none"
    else:
        smoothing = "smoothing windows: " + ", ".join(
            f"{t} {w}" + (" (not tuned: no val label)" if t in plan.untuned else "")
            for t, w in plan.windows.items()
        )
    notes = [smoothing]
    if "au" in plan.expected:
        notes.append(f"AU thresholds: {plan.thresholds.source}")
    if plan.out.path != plan.out.given.absolute():
        notes.append(f"{plan.out.given} is {plan.out.path}")
    return notes


def write_files(
    folder: Path,
    preds: Predictions,
    expected: dict[str, dict[str, int]],
    windows: dict[str, int] | None,
    thresholds: np.ndarray,
    source: Path,
) -> list[Path]:
    """Write ``folder/<Challenge>/<video>.txt`` for each ``expected[task][video]`` = N frames:
    complete the video's outputs to N frames, smooth (``windows``), format. Images after frame N
    are left out. Returns the paths."""
    written = []
    for video, frames, rows in video_rows(preds.keys, source):
        for task, videos in expected.items():
            if video not in videos:
                continue
            total = videos[video]
            kept, values = within_count(frames, task_values(task, preds.outputs[task][rows]), total)
            window = 1 if windows is None else windows[task]
            filled = complete_and_smooth(task, kept, values, total, window)
            path = _output_path(folder, task, video, source)
            _write_prediction(path, task, filled, thresholds)
            written.append(path)
    return written


def within_count(
    frames: np.ndarray, values: np.ndarray, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """The frames (and their rows of ``values``) within 1..``total``, what completion starts
    from. When every image lies after frame ``total``, the first image's row stands at frame
    ``total`` (the nearest frame any image has), so the video is still written whole."""
    kept = frames <= total
    if kept.any():
        return frames[kept], values[kept]
    return np.array([total]), values[:1]


def _videos_wanted(manifest: dict, config: EvalConfig) -> dict[str, set[str]] | None:
    """For the test split, each task's listed videos (what to write); None for train and val."""
    split = manifest.get("splits", {}).get(config.split)
    if split is None:
        advice = "; pack the tree with --test-videos" if config.split == "test" else ""
        raise DataError(config.shards / MANIFEST, f"no {config.split} split in this pack{advice}")
    if config.split != "test":
        return None
    return {task: set(names) for task, names in split.get("lists", {}).items()}


def split_key(key: str, source: Path) -> tuple[str, int]:
    """(video, frame) of a shard key ``<video>/<NNNNN>``. Keys come from shards, and a video name
    becomes a file name: anything that could leave the output folder is a DataError."""
    video, _, frame = key.rpartition("/")
    if not is_video_name(video) or len(frame) != FRAME_DIGITS or not frame.isdigit():
        raise DataError(
            source,
            f"sample key {excerpt(key)} is not <video>/<NNNNN> with a plain video name "
            "(printable ASCII, no space, slash or dot): refusing to write a file for it",
        )
    return video, int(frame)


def video_rows(keys: list[str], source: Path):
    """``(video, frames, rows)`` per video of sorted keys (``Predictions`` sorts them): each
    video's frames are one contiguous run of rows, in frame order."""
    parsed = [split_key(key, source) for key in keys]
    start = 0
    for i in range(1, len(parsed) + 1):
        if i == len(parsed) or parsed[i][0] != parsed[start][0]:
            frames = np.array([frame for _, frame in parsed[start:i]], dtype=np.int64)
            yield parsed[start][0], frames, slice(start, i)
            start = i


def task_values(task: str, outputs: np.ndarray) -> np.ndarray:
    """What is completed and smoothed per frame: VA values, EXPR softmax probabilities (from the
    logits), AU probabilities (``predict_split`` already applied the sigmoid)."""
    if task != "expr":
        return outputs.astype(np.float64)
    logits = outputs.astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def image_frames(shards: Path, split: str) -> dict[str, np.ndarray]:
    """The frames with an image of each video of the split (sorted), from the shards' DALI index
    files (a line per sample, its first member's name fourth): known before the model runs, so
    a bad frame count stops predict before the inference, not after it."""
    found: dict[str, list[int]] = {}
    for shard in split_shards(shards, split):
        limit = 4096 + INDEX_LINE_LIMIT * shard.samples
        text = read_text(shard.idx, limit=limit, encoding="ascii", follow_links=False, what="index")
        for number, line in enumerate(text.splitlines()[1:], start=2):  # after "v1.2 N"
            fields = line.split(" ", 4)
            if len(fields) < 4:
                raise DataError(shard.idx, "expected 'ext offset size name' groups", number)
            video, frame = split_key(split_member(fields[3])[0], shard.idx)
            found.setdefault(video, []).append(frame)
    return {video: np.unique(found[video]) for video in sorted(found)}


# --- frame counts ---------------------------------------------------------------------------------


def read_frame_counts(path: str | Path) -> dict[str, tuple[int, int]]:
    """``{video: (frames, line)}`` from a CSV with the header ``video,frames``, one line per video.

    Read as a regular file of at most :data:`FRAME_COUNTS_LIMIT` bytes. A wrong header, a line
    without exactly two fields, a count that is not an integer in 1..:data:`MAX_FRAMES`, a bad
    video name or a video listed twice is a DataError naming the file and line.
    """
    path = Path(path)
    text = read_text(path, limit=FRAME_COUNTS_LIMIT, encoding="utf-8-sig", what="frame-count CSV")
    lines = text.splitlines()
    header = [f.strip().lower() for f in lines[0].split(",")] if lines else []
    if header != list(FRAME_COUNTS_HEADER):
        got = excerpt(lines[0] if lines else "")
        raise DataError(path, f"expected the header 'video,frames', got {got}", 1)
    counts: dict[str, tuple[int, int]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            raise DataError(path, f"expected 'video,frames', got {excerpt(line)}", number)
        video, frames = fields
        if not is_video_name(video):
            raise DataError(path, f"{excerpt(video)} is not a video name", number)
        digits = frames.lstrip("0")  # int() of a huge string is slow, and refused past 4300
        if not frames.isascii() or not frames.isdigit() or not digits:
            raise DataError(path, f"frames {excerpt(frames)}: expected a positive integer", number)
        if len(digits) > len(str(MAX_FRAMES)) or int(digits) > MAX_FRAMES:
            raise DataError(path, f"video {video}: {_too_many(digits)}", number)
        if video in counts:
            raise DataError(
                path, f"video {video} is listed twice (first on line {counts[video][1]})", number
            )
        counts[video] = (int(frames), number)
    return counts


def _too_many(count: int | str) -> str:
    """Why a frame count (an int, or a CSV's digits) is refused."""
    text = str(count)
    shown = text if len(text) <= 20 else f"{text[:12]}... ({len(text)} digits)"
    return (
        f"{shown} frames is more than any video has: frame names have {FRAME_DIGITS} digits, "
        f"so at most {MAX_FRAMES:,}"
    )


def resolve_frame_counts(
    images: dict[str, np.ndarray],
    annotated: dict[str, int],
    given: dict[str, tuple[int, int]] | None,
    csv: Path | None,
) -> dict[str, FrameCount]:
    """``{video: FrameCount}`` for each predicted video (``images``: its sorted frames with an
    image).

    N is the ``given`` CSV count where it names the video, else the manifest's count from the
    annotations, else, without a CSV, the last image; with a CSV, a video it must supply (no
    count in the manifest) and lacks is a DataError. A given count is authoritative: images
    after frame N are left out (counted in ``left_out``), never a reason to refuse.
    """
    resolved = {}
    for video, frames in images.items():
        last = int(frames[-1])
        if given is not None and video in given:
            count, source = given[video][0], FROM_CSV
        elif video in annotated:
            count, source = int(annotated[video]), FROM_ANNOTATIONS
        elif given is not None:
            raise DataError(
                csv,
                f"no line for video {video}: it has no annotation file, so its frame count must "
                "come from here",
            )
        else:
            count, source = last, FROM_LAST_IMAGE
        left_out = len(frames) - int(np.searchsorted(frames, count, side="right"))
        resolved[video] = FrameCount(count, source, last, left_out)
    return resolved


# --- smoothing windows, the output files ---------------------------------------------------------


def _smoothing_windows(
    path: Path, fingerprint: Fingerprint, tasks: tuple[str, ...]
) -> tuple[dict[str, int], tuple[str, ...]]:
    """(a window for each of ``tasks``, the tasks among them not tuned for want of val labels:
    window 1) from ``path``, which must be the windows tuned for this checkpoint."""
    if not (path.exists() or path.is_symlink()):
        raise DataError(
            path,
            "no smoothing windows beside the checkpoint: run `affectfast evaluate CKPT SHARDS "
            "--tune-smoothing` first (it tunes them on val and writes this file)",
        )
    windows, _, absent = load_windows(path, fingerprint)
    missing = [t for t in tasks if t not in windows and t not in absent]
    if missing:
        raise DataError(
            path,
            f"no window for {','.join(missing)}; run `affectfast evaluate CKPT SHARDS "
            "--tune-smoothing` again",
        )
    untuned = tuple(t for t in tasks if t not in windows)
    return {t: int(windows.get(t, 1)) for t in tasks}, untuned


def _output_path(folder: Path, task: str, video: str, source: Path) -> Path:
    """``folder/<Challenge>/<video>.txt``, checked to resolve inside ``folder``."""
    path = folder / CHALLENGE_DIRS[task][0] / f"{video}.txt"
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(source, f"video {excerpt(video)} would be written outside {folder}")
    path.parent.mkdir(exist_ok=True)
    return path


def _write_prediction(path: Path, task: str, rows: np.ndarray, thresholds: np.ndarray) -> None:
    """One file: the task's header, then a line per row (= frame)."""
    if task == "va":
        lines = [f"{v:.6f},{a:.6f}" for v, a in np.clip(rows, -1, 1)]
    elif task == "expr":
        lines = [str(int(c)) for c in rows.argmax(1)]
    else:
        lines = [",".join("1" if x else "0" for x in r) for r in rows > thresholds]
    path.write_text(",".join(HEADERS[task]) + "\n" + "".join(line + "\n" for line in lines))


# --- the format checker --------------------------------------------------------------------------


def check_prediction_file(path: str | Path, task: str, frames: int | None = None) -> int:
    """Check one prediction file against the ABAW format; return its number of frame lines.

    Line 1 is the task's header (VA ``valence,arousal``, EXPR the 8 expression names, AU the 12
    AU names, comma-separated), then one line per frame: VA two numbers in [-1, 1], EXPR one
    integer 0..7, AU twelve comma-separated 0/1. No blank line; ``frames`` lines where given. Any
    deviation is a DataError naming the file and line.
    """
    path = Path(path)
    try:
        text = read_text(path, limit=PREDICTION_LIMIT, encoding="ascii", what="prediction file")
    except OSError as error:
        raise DataError(path, f"cannot read the prediction file: {error.strerror}") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline
        lines.pop()
    expected = ",".join(HEADERS[task])
    if not lines or lines[0] != expected:
        got = excerpt(lines[0] if lines else "")
        raise DataError(path, f"expected the {task} header {expected!r}, got {got}", 1)
    for number, line in enumerate(lines[1:], start=2):
        problem = _LINE_CHECKS[task](line)
        if problem:
            raise DataError(path, f"{problem}, got {excerpt(line)}", number)
    if frames is not None and len(lines) - 1 != frames:
        raise DataError(
            path, f"{len(lines) - 1} frame lines, expected {frames} (one per frame of the video)"
        )
    return len(lines) - 1


def _check_va_line(line: str) -> str | None:
    fields = line.split(",")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        values = []
    if len(fields) != 2 or len(values) != 2 or not all(-1 <= v <= 1 for v in values):
        return "expected 'valence,arousal', two numbers in [-1, 1]"
    return None


def _check_expr_line(line: str) -> str | None:
    if not (line.isascii() and line.isdigit() and int(line) < NUM_EXPR):
        return f"expected one integer 0..{NUM_EXPR - 1} ({', '.join(EXPR_NAMES)})"
    return None


def _check_au_line(line: str) -> str | None:
    fields = line.split(",")
    if len(fields) != NUM_AU or not all(f in ("0", "1") for f in fields):
        return f"expected {NUM_AU} comma-separated 0/1 values ({','.join(HEADERS['au'])})"
    return None


_LINE_CHECKS = {"va": _check_va_line, "expr": _check_expr_line, "au": _check_au_line}


def check_submission(folder: str | Path, expected: dict[str, dict[str, int]]) -> int:
    """Check a submission folder: ``expected[task][video]`` frames for each file, and no other file
    in the challenge folders. Returns the number of files checked; DataError at the first problem."""
    folder = Path(folder)
    checked = 0
    for task in TASKS:
        challenge = folder / CHALLENGE_DIRS[task][0]
        videos = expected.get(task, {})
        present = sorted(p.name for p in challenge.iterdir()) if challenge.is_dir() else []
        extra = sorted(set(present) - {f"{v}.txt" for v in videos})
        if extra:
            raise DataError(challenge / extra[0], f"not expected in a {task} submission")
        for video, frames in videos.items():
            path = challenge / f"{video}.txt"
            if not path.is_file():
                raise DataError(path, f"missing: the {task} submission needs a file for {video}")
            check_prediction_file(path, task, frames)
            checked += 1
    return checked
