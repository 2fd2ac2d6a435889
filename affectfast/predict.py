"""Evaluate and predict with a checkpoint: ABAW metric tables and complete ABAW submissions.

``evaluate(EvalConfig)`` scores a checkpoint on a labelled split with the same validation pass
training runs (``train.predict_split`` + ``train.score``); with ``tune_smoothing`` it also chooses a
smoothing window per task on that split and saves it beside the checkpoint (``smoothing.json``).
``predict(EvalConfig, out)`` writes one file per video and task in the challenge layout, with a line
for *every* frame of the video, faces or not (docs/design.md §6). The checkpoint carries the run's
config (tasks, image size, precision), so nothing else is needed.

Per video and task, always in this order (``docs/smoothing.md``):

1. the model's outputs on the frames that have an image (VA values, EXPR softmax probabilities,
   AU probabilities);
2. complete: every frame 1..N gets a row (``smoothing.complete_video``: linear for VA, the nearest
   frame for EXPR and AU), N the video's frame count;
3. smooth (``--smooth``: the windows tuned on val), then score (evaluate) or write (predict):
   VA clipped to [-1, 1], EXPR the most probable class, AU 1 above the checkpoint's per-AU
   thresholds (0.5 without).

N comes from a ``--frame-counts`` CSV where it names the video, else the manifest (the video's
annotation lines), else the last frame with an image; the summary says which for each video.

``predict`` writes everything into a temporary folder beside ``out``, checks every file with
:func:`check_submission`, and only then swaps it in place of ``out``: a failed run leaves ``out`` as
it was, and a finished one never leaves files of an earlier run behind. ``out`` must be missing,
empty or an earlier prediction folder (it holds :data:`MARKER`): a folder of other files is
refused, never replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from affectfast.affwild2 import FRAME_DIGITS, is_video_name
from affectfast.config import EvalConfig, TrainConfig
from affectfast.dist import setup_distributed, teardown_distributed
from affectfast.errors import DataError
from affectfast.metrics import Predictions
from affectfast.model import AffectNet
from affectfast.rundir import load_checkpoint
from affectfast.shards import MANIFEST, load_manifest, split_shards
from affectfast.smoothing import (
    INTERPOLATION,
    SMOOTHING_FILE,
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
from affectfast.train import (
    build_autocast,
    build_eval_loader,
    predict_split,
    resolve_device,
    score,
)

# In a prediction folder: what wrote it (checkpoint, shards, split, smoothing, frame counts). It
# marks the folder as one predict may replace; hidden, so a submission archive of the challenge
# folders leaves it out.
MARKER = ".affectfast-predict.json"
FRAME_COUNTS_HEADER = ("video", "frames")
# Where a video's frame count came from, as the summary names it.
FROM_CSV, FROM_ANNOTATIONS, FROM_LAST_IMAGE = "--frame-counts", "annotations", "last image"


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


# --- evaluate ------------------------------------------------------------------------------------


def evaluate(config: EvalConfig) -> dict | None:
    """The checkpoint's metrics on ``config.split`` of ``config.shards`` (all ranks gathered) on
    the main rank; None on the other ranks of a torchrun launch.

    With ``tune_smoothing`` also ``metrics["smoothing"]`` = ``{"windows", "scores", "path"}``: each
    task's window chosen on the split (raw and smoothed scores in ``scores``), saved beside the
    checkpoint as ``smoothing.json``.
    """
    if config.split == "test":
        raise DataError(
            config.shards / MANIFEST,
            "the test split has no labels, so nothing to score: evaluate train or val, and "
            "write test predictions with `affectfast predict --split test`",
        )
    manifest = load_manifest(config.shards) if config.tune_smoothing else {}
    preds, run, is_main, checkpoint = _predict_split(config)
    if not is_main:  # the main rank holds every rank's predictions, and reports
        return None
    metrics = score(preds, run.tasks, config.tune_au_thresholds)
    if config.tune_smoothing:
        thresholds = checkpoint.get("au_thresholds")
        counts = manifest.get("frame_counts", {})
        windows, scores = tune_smoothing(preds, run.tasks, counts, thresholds, source=config.shards)
        path = config.checkpoint.parent / SMOOTHING_FILE
        save_windows(path, windows, scores)
        metrics["smoothing"] = {"windows": windows, "scores": scores, "path": str(path)}
    return metrics


def tune_smoothing(
    preds: Predictions,
    tasks: tuple[str, ...],
    frame_counts: dict[str, int],
    au_thresholds: list[float] | None = None,
    *,
    grid: tuple[int, ...] = WINDOW_GRID,
    source: Path = Path("."),
) -> tuple[dict[str, int], dict[str, dict]]:
    """``smoothing.tune_windows`` on every video of ``preds`` completed to its frame count.

    Outputs are completed over frames 1..N (``frame_counts``, else the last predicted frame); the
    frames without a prediction have no label in the shards, so they are masked out of the score.
    AU is scored at ``au_thresholds`` where given (the checkpoint's), as predict will write it.
    ``grid``: the windows tried; ``source`` (the shards) is named in the error for a malformed
    key.
    """
    outputs: dict[str, list] = {t: [] for t in tasks}
    labels: dict[str, list] = {t: [] for t in tasks}
    masks: dict[str, list] = {t: [] for t in tasks}
    for video, frames, rows in video_rows(preds.keys, source):
        total = max(frame_counts.get(video, 0), int(frames[-1]))
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
    lines.append(f"saved {smoothing['path']}")
    return "\n".join(lines)


# --- predict -------------------------------------------------------------------------------------


@dataclass
class Submission:
    """What :func:`predict` wrote: the files, and per video its frame count and their source."""

    out: Path
    split: str
    files: list[Path] = field(default_factory=list)
    frames: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # (N, source, last image)
    windows: dict[str, int] | None = None  # smoothing windows applied, None without --smooth
    skipped: list[str] = field(default_factory=list)  # why a task got no file, one line each

    def summary(self) -> str:
        """What was written, and for each video its frame count and where it came from."""
        smoothing = (
            "no smoothing"
            if self.windows is None
            else "smoothed: " + ", ".join(f"{t} {w}" for t, w in self.windows.items())
        )
        width = max([len("video"), *map(len, self.frames)])
        lines = [
            f"wrote {len(self.files)} prediction files under {self.out} (split {self.split}, "
            f"{smoothing}), every frame 1..N of each video, format checked",
            *self.skipped,
            f"{'video':<{width}}  {'N':>7}  {'N from':<16}{'last image':>10}",
        ]
        for video, (total, source, last) in self.frames.items():
            lines.append(f"{video:<{width}}  {total:>7}  {source:<16}{last:>10}")
        return "\n".join(lines)


def predict(config: EvalConfig, out: str | Path) -> Submission:
    """Write a complete ABAW submission for ``config.split``: ``out/<Challenge>/<video>.txt``.

    Train and val: a file per trained task and video of the split. Test: a file per trained task
    and video that task's test list names (the manifest holds the lists). Every file has the task's
    header and one line per frame 1..N (see the module docstring). Bad input (a frame-count CSV
    that is malformed, misses a video or counts fewer frames than its images, smoothing asked for
    without smoothing.json, a split the pack lacks, ``out`` a folder of other files) is a
    DataError before anything is written.
    """
    out = Path(out)
    manifest = load_manifest(config.shards)
    wanted = _videos_wanted(manifest, config)
    last_images = _last_images(config)  # from the shard index, before any inference
    unseen = sorted(set().union(*(wanted or {}).values()) - set(last_images))
    if unseen:  # every image of it was bad and skipped at pack time, say
        raise DataError(
            config.shards / MANIFEST,
            f"video {unseen[0]} is in a test list but has no frame in the test shards: "
            "nothing to predict it from",
        )
    given = read_frame_counts(config.frame_counts) if config.frame_counts else None
    frames = resolve_frame_counts(
        last_images, manifest.get("frame_counts", {}), given, config.frame_counts
    )
    checkpoint = load_checkpoint(config.checkpoint)
    trained = tuple(checkpoint["config"]["tasks"])
    tasks = [t for t in trained if wanted is None or t in wanted]
    if not tasks:
        raise DataError(
            config.shards / MANIFEST,
            f"the checkpoint predicts {','.join(trained)} but the test split lists videos for "
            f"{','.join(wanted)} only: nothing to write",
        )
    windows = _smoothing_windows(config, trained) if config.smooth else None
    _check_out(out)

    preds, _, is_main, _ = _predict_split(config, checkpoint)
    submission = Submission(out, config.split, frames=frames, windows=windows)
    if not is_main:
        return submission
    submission.skipped = [
        f"no {t} files: the test split has no {t} list" for t in trained if t not in tasks
    ]
    submission.skipped += [
        f"no {t} files: the checkpoint has no {t} head" for t in wanted or () if t not in trained
    ]
    thresholds = np.asarray(checkpoint.get("au_thresholds") or [0.5] * NUM_AU)
    staging = _new_folder(out, "tmp")
    try:
        expected = {
            task: {v: frames[v][0] for v in sorted(frames) if wanted is None or v in wanted[task]}
            for task in tasks
        }
        for path in write_files(staging, preds, expected, windows, thresholds, config.shards):
            submission.files.append(out / path.relative_to(staging))
        check_submission(staging, expected)
        _write_marker(staging / MARKER, config, submission)
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap
    return submission


def write_files(
    folder: Path,
    preds: Predictions,
    expected: dict[str, dict[str, int]],
    windows: dict[str, int] | None,
    thresholds: np.ndarray,
    source: Path,
) -> list[Path]:
    """Write ``folder/<Challenge>/<video>.txt`` for each ``expected[task][video]`` = N frames:
    complete the video's outputs to N frames, smooth (``windows``), format. Returns the paths."""
    written = []
    for video, frames, rows in video_rows(preds.keys, source):
        for task, videos in expected.items():
            if video not in videos:
                continue
            values = task_values(task, preds.outputs[task][rows])
            window = 1 if windows is None else windows[task]
            filled = complete_and_smooth(task, frames, values, videos[video], window)
            path = _output_path(folder, task, video, source)
            _write_prediction(path, task, filled, thresholds)
            written.append(path)
    return written


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
            f"sample key {key[:80]!r} is not <video>/<NNNNN> with a plain video name "
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


def _last_images(config: EvalConfig) -> dict[str, int]:
    """The last frame with an image of each video of the split, from the shards' DALI index files
    (a line per sample, its first member's name fourth): known before the model runs, so a bad
    frame count stops predict before the inference, not after it."""
    last: dict[str, int] = {}
    for shard in split_shards(config.shards, config.split):
        try:
            with open(shard.idx, encoding="ascii") as index:
                lines = index.read().splitlines()[1:]  # after "v1.2 N"
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(shard.idx, f"cannot read the shard index: {error}") from None
        for number, line in enumerate(lines, start=2):
            fields = line.split(" ", 4)
            if len(fields) < 4:
                raise DataError(shard.idx, "expected 'ext offset size name' groups", number)
            video, frame = split_key(split_member(fields[3])[0], shard.idx)
            last[video] = max(last.get(video, 0), frame)
    return dict(sorted(last.items()))


# --- frame counts ---------------------------------------------------------------------------------


def read_frame_counts(path: str | Path) -> dict[str, tuple[int, int]]:
    """``{video: (frames, line)}`` from a CSV with the header ``video,frames``, one line per video.

    A wrong header, a line without exactly two fields, a count that is not a positive integer, a
    bad video name or a video listed twice is a DataError naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as error:
        raise DataError(path, f"cannot read the frame counts: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DataError(path, "the frame counts are not UTF-8 text") from None
    header = [f.strip().lower() for f in lines[0].split(",")] if lines else []
    if header != list(FRAME_COUNTS_HEADER):
        got = lines[0][:80] if lines else ""
        raise DataError(path, f"expected the header 'video,frames', got {got!r}", 1)
    counts: dict[str, tuple[int, int]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            raise DataError(path, f"expected 'video,frames', got {line[:80]!r}", number)
        video, frames = fields
        if not is_video_name(video):
            raise DataError(path, f"{video[:80]!r} is not a video name", number)
        if not frames.isascii() or not frames.isdigit() or int(frames) < 1:
            raise DataError(path, f"frames {frames[:80]!r}: expected a positive integer", number)
        if video in counts:
            raise DataError(
                path, f"video {video} is listed twice (first on line {counts[video][1]})", number
            )
        counts[video] = (int(frames), number)
    return counts


def resolve_frame_counts(
    last_images: dict[str, int],
    annotated: dict[str, int],
    given: dict[str, tuple[int, int]] | None,
    csv: Path | None,
) -> dict[str, tuple[int, str, int]]:
    """``{video: (N, source, last image)}`` for each predicted video (``last_images``).

    N is the ``given`` CSV count where it names the video (fewer frames than its last image is a
    DataError naming the line), else the manifest's count from the annotations (at least the last
    image), else, without a CSV, the last image; with a CSV, a video it must supply (no count in
    the manifest) and lacks is a DataError.
    """
    resolved = {}
    for video, last in last_images.items():
        if given is not None and video in given:
            count, line = given[video]
            if count < last:
                raise DataError(
                    csv,
                    f"video {video} has {count} frames here, but an image of frame {last}",
                    line,
                )
            resolved[video] = (count, FROM_CSV, last)
        elif video in annotated:
            resolved[video] = (max(int(annotated[video]), last), FROM_ANNOTATIONS, last)
        elif given is not None:
            raise DataError(
                csv,
                f"no line for video {video}: it has no annotation file, so its frame count must "
                "come from here",
            )
        else:
            resolved[video] = (last, FROM_LAST_IMAGE, last)
    return resolved


# --- smoothing windows, the output folder --------------------------------------------------------


def _smoothing_windows(config: EvalConfig, tasks: tuple[str, ...]) -> dict[str, int]:
    """The windows in smoothing.json beside the checkpoint, one for each of its tasks."""
    path = config.checkpoint.parent / SMOOTHING_FILE
    if not path.exists():
        raise DataError(
            path,
            "no smoothing windows beside the checkpoint: run `affectfast evaluate CKPT SHARDS "
            "--tune-smoothing` first (it tunes them on val and writes this file)",
        )
    windows, _ = load_windows(path)
    missing = [t for t in tasks if t not in windows]
    if missing:
        raise DataError(
            path,
            f"no window for {','.join(missing)}: tuned for another model; run `affectfast "
            "evaluate CKPT SHARDS --tune-smoothing` again",
        )
    return {t: int(windows[t]) for t in tasks}


def _check_out(out: Path) -> None:
    """``out`` must be missing, an empty folder or an earlier prediction folder (holds MARKER)."""
    if not out.exists():
        if not out.parent.is_dir():
            raise DataError(out.parent, "the folder that should hold --out does not exist")
        return
    if not out.is_dir():
        raise DataError(out, "--out exists and is not a folder")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise DataError(
            out,
            f"--out is not empty and not an earlier prediction folder (no {MARKER}); predict "
            "replaces its folder whole, so choose a new or empty --out",
        )


def _output_path(folder: Path, task: str, video: str, source: Path) -> Path:
    """``folder/<Challenge>/<video>.txt``, checked to resolve inside ``folder``."""
    path = folder / CHALLENGE_DIRS[task][0] / f"{video}.txt"
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(source, f"video {video!r} would be written outside {folder}")
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


def _write_marker(path: Path, config: EvalConfig, submission: Submission) -> None:
    record = {
        "written_by": "affectfast predict",
        "checkpoint": str(config.checkpoint),
        "shards": str(config.shards),
        "split": config.split,
        "smoothing": submission.windows,
        "frame_counts": {v: {"frames": n, "from": s} for v, (n, s, _) in submission.frames.items()},
        "files": len(submission.files),
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def _new_folder(out: Path, kind: str) -> Path:
    """A new hidden folder beside ``out``: ``.<name>.<random>.<kind>`` (created with the umask's
    mode, unlike ``tempfile.mkdtemp``'s 0700, since it becomes ``out``)."""
    path = out.parent / f".{out.name}.{secrets.token_hex(6)}.{kind}"
    path.mkdir()
    return path


def _swap_into_place(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder at ``out``, removing the earlier one there.

    Two renames on one filesystem: ``out`` moves aside, ``staging`` takes its name, then the old
    one is deleted. A crash between the renames leaves the earlier folder beside ``out`` under a
    hidden ``.<name>.*.old`` name, never a mix of two runs.
    """
    if not out.exists():
        os.rename(staging, out)
        return
    aside = _new_folder(out, "old")
    os.rename(out, aside / out.name)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(aside / out.name, out)  # the earlier predictions back in place
        aside.rmdir()
        raise
    shutil.rmtree(aside)


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
        lines = path.read_text(encoding="ascii").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot read the prediction file as ASCII text: {error}") from None
    if lines[-1] == "":  # the final newline
        lines.pop()
    expected = ",".join(HEADERS[task])
    if not lines or lines[0] != expected:
        got = lines[0][:80] if lines else ""
        raise DataError(path, f"expected the {task} header {expected!r}, got {got!r}", 1)
    for number, line in enumerate(lines[1:], start=2):
        problem = _LINE_CHECKS[task](line)
        if problem:
            raise DataError(path, f"{problem}, got {line[:80]!r}", number)
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
