"""A synthetic Aff-Wild2 tree whose labels are drawn into the pixels (docs/design.md §1 and §5).

``synthesize(SynthConfig(out=...))`` writes the real ABAW layout::

    OUT/cropped_aligned/<video>/<NNNNN>.jpg                       five-digit 1-based frame numbers
    OUT/annotations/<Challenge>/{Train_Set,Validation_Set}/<video>.txt

Every frame is a synthetic face whose every label can be read back from the pixels, so a model that
learns them proves that frames and labels stayed aligned through pack and load. The encoding is
mirror-symmetric (it survives a horizontal flip) and coarse (it survives rotation by ±15°, resizing
to 32 px and JPEG):

- valence: the grey level of the background, ``0.5 + 0.4 * v``;
- arousal: the brightness of the face ellipse (a skin tone whose channel mean is ``0.5 + 0.3 * a``);
- expression: the colour of a disc in the middle of the face, one of 8 corners of the RGB cube;
- AU k: a mirrored pair of marks at the k-th of 12 fixed positions, in the k-th of 12 saturated
  hues, drawn when the AU is 1.

Each video has mild variation of its own (face position and size, background tint, skin hue, noise
level). The image always shows the underlying label, also where the annotation file says "ignore".

The tree has the quirks of the real release: frames with no image, runs of -5 / -1 ignore markers,
videos that lack one task's file, ``_left``/``_right`` subjects, a Train_Set / Validation_Set split
by video, annotation lines past the last image, some files without a final newline, and labels that
change smoothly along a video.

Three options make harder trees; at their defaults the tree is byte-identical to a tree made without
them:

- ``noisy_frames``: that fraction of frames has its cues corrupted (an occlusion, an exposure jump
  or a blur, see :func:`corrupt_frame`) while the labels stay smooth along the video, so a
  per-frame reader errs on those frames and temporal smoothing helps (``affectfast.smoothing``);
- ``onset_cues`` (K): the expression and AU cues show only around their segments' changes, the
  labels stay constant over each segment, so a per-frame reader is blind between changes and only
  a model of time can carry a segment's label along it (see :func:`cue_visibility`). The disc
  shows the class colour on the first K frames of each expression segment and :data:`NEUTRAL_DISC`
  after them; AU k's marks show in its colour on the first K frames of each "on" segment (its
  onset) and in black on its last K frames (its offset), and nowhere else. Valence and arousal show on every frame. Segments are then
  :data:`ONSET_SEGMENT` frames long: longer than the widest smoothing window, so smoothing cannot
  spread an onset over its segment, and at most 120, so with sequence windows of 256 frames at a
  stride of 128 every frame shares a window with its segment's onset. AU segments alternate on and
  off, so every "on" run is one segment with an onset of its own.
- ``test_videos``: that many more frame folders held out as an ABAW test set: frames written,
  annotations written nowhere, and ``OUT/test_lists/{VA,EXPR,AU}_test_set.txt`` (one video name a
  line; the lists differ per challenge as ABAW's do) with ``OUT/test_lists/frame_counts.csv``.

Determinism: the tree plan comes from ``seed`` alone and each video's labels from ``(seed, video)``,
each frame's noise and corruption from ``(seed, video, frame)``, so the tree is byte-identical for
any worker count.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from affectfast.affwild2 import FRAMES_DIR, image_path
from affectfast.tasks import (
    AU_IGNORE,
    CHALLENGE_DIRS,
    EXPR_IGNORE,
    HEADERS,
    NUM_AU,
    NUM_EXPR,
    SPLIT_DIRS,
    TASKS,
    VA_IGNORE,
)

ANNOTATIONS_DIR = "annotations"
# Folder per task: the first (current) challenge name of each task.
TASK_DIRS: dict[str, str] = {task: names[0] for task, names in CHALLENGE_DIRS.items()}
SET_DIRS: dict[str, str] = {split: folder for folder, split in SPLIT_DIRS.items()}
JPEG_QUALITY = 90
# The held-out test set (SynthConfig.test_videos): one list of video names per challenge, as ABAW
# releases them, and each test video's frame count.
TEST_LISTS_DIR = "test_lists"
TEST_LISTS: dict[str, str] = {
    "va": "VA_test_set.txt",
    "expr": "EXPR_test_set.txt",
    "au": "AU_test_set.txt",
}
FRAME_COUNTS_FILE = "frame_counts.csv"

# --- the pixel encoding (normalized coordinates: the image spans [-1, 1], y grows downwards) ------
# Expression colours: the 8 corners of the RGB cube, as far apart as colours can be.
EXPR_COLOURS = np.array(
    [
        (1, 0, 0),
        (0, 1, 0),
        (0, 0, 1),
        (1, 1, 0),
        (0, 1, 1),
        (1, 0, 1),
        (1, 1, 1),
        (0, 0, 0),
    ],
    dtype=np.float32,
)
FACE_AXES = (0.62, 0.8)  # face ellipse semi-axes (x, y)
DISC_RADIUS = 0.26  # expression disc
# The disc where the expression cue is hidden (SynthConfig.onset_cues): mid grey, the same distance
# (0.87) from every class colour, so it tells nothing about the class.
NEUTRAL_DISC = np.array((0.5, 0.5, 0.5), dtype=np.float32)
NO_CUE = -1  # the expression passed to draw_frame (and read back) where the disc is neutral
NEUTRAL_READ_DISTANCE = 0.15  # labels_from_pixels: a centre this close to NEUTRAL_DISC reads NO_CUE
# How an AU's marks show (cue_visibility, draw_frame): not at all, in the AU's colour, or in black
# (an onset-cue tree's offset). Black: no skin tone or background level comes near it.
MARK_HIDDEN, MARK_COLOUR, MARK_DARK = 0, 1, 2
DARK_READ_DISTANCE = 0.15  # labels_from_pixels: a mark pixel this close to black reads as a mark
MARK_RADIUS = 0.1  # AU marks


def _ring(radius: float, degrees: tuple[float, ...]) -> list[tuple[float, float]]:
    """Points on a circle around the centre, angles in degrees clockwise from straight up."""
    return [(radius * np.sin(np.radians(d)), -radius * np.cos(np.radians(d))) for d in degrees]


# Right-hand member of each AU's mirrored pair (the left one is at -x), in AU_NAMES order.
# Three rings keep marks >= 0.07 apart and clear of the disc and of the readout patches below.
AU_POSITIONS: tuple[tuple[float, float], ...] = tuple(
    _ring(0.45, (30, 70, 110, 150))
    + _ring(0.75, (15, 45, 75, 105, 135, 165))
    + _ring(0.92, (60, 120))
)


def _hue(degrees: float) -> tuple[float, float, float]:
    """A fully saturated colour of the given hue (0 red, 120 green, 240 blue)."""
    return tuple(
        float(np.clip(2 - abs((degrees - centre + 180) % 360 - 180) / 60, 0, 1))
        for centre in (0, 120, 240)
    )


# AU k's marks have their own saturated hue as well as their own position: a network that pools
# globally reads colour more easily than position. Neighbouring marks are 150 degrees of hue apart.
MARK_COLOURS = np.array([_hue(30 * ((5 * k) % 12)) for k in range(12)], dtype=np.float32)
# Readout patches (x0, x1, y0, y1) on the vertical axis, where no mark ever lands.
VALENCE_PATCHES = ((-0.06, 0.06, -0.98, -0.9), (-0.06, 0.06, 0.9, 0.98))
AROUSAL_PATCHES = ((-0.05, 0.05, -0.6, -0.42), (-0.05, 0.05, 0.42, 0.6))


def background_level(valence):
    """Background grey level in [0, 1] for a valence in [-1, 1]."""
    return 0.5 + 0.4 * np.asarray(valence)


def skin_level(arousal):
    """Mean channel level of the face in [0, 1] for an arousal in [-1, 1]."""
    return 0.5 + 0.3 * np.asarray(arousal)


# --- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize: ``videos`` frame folders (subjects) of ``frames`` frames each, and
    ``test_videos`` more held out as a test set."""

    out: Path  # tree root; must be missing or empty unless overwrite
    videos: int = 40  # frame folders, _left/_right subjects counted separately
    frames: int = 200  # frames per video (before gaps)
    seed: int = 0
    image_size: int = 112  # square frames, pixels (the real crops are 112)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False  # allow a non-empty OUT (files of an older tree may remain)
    # Fraction of frames whose cues are corrupted (occlusion, exposure jump or blur) while their
    # labels stay as smooth as ever: per-frame predictions get noisy, temporal smoothing helps.
    noisy_frames: float = 0.0
    # Extra frame folders held out as an ABAW test set: frames written, no annotation file,
    # listed per challenge under test_lists/ (see TEST_LISTS_DIR).
    test_videos: int = 0
    # K > 0: expression and AU cues show only on the K frames at each segment's onset (and black AU
    # marks at an AU's offset), labels constant over the segment: only a model of time can win.
    onset_cues: int = 0

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.videos < 4:
            raise ValueError(
                f"videos must be >= 4 (room for both splits and a _left/_right pair); "
                f"got {self.videos}"
            )
        if self.frames < 10:
            raise ValueError(f"frames must be >= 10; got {self.frames}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024]; got {self.image_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1; got {self.workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed}")
        if not 0.0 <= self.noisy_frames <= 1.0:
            raise ValueError(f"noisy_frames must be in [0, 1]; got {self.noisy_frames}")
        if self.test_videos < 0:
            raise ValueError(f"test_videos must be >= 0; got {self.test_videos}")
        if not 0 <= self.onset_cues <= MAX_ONSET_CUES:
            raise ValueError(
                f"onset_cues must be in [0, {MAX_ONSET_CUES}] (half the shortest segment, so an "
                f"AU's onset and offset never meet); got {self.onset_cues}"
            )


# --- the tree plan: names, splits, pairs and tree-level quirks, from the seed alone --------------
@dataclass(frozen=True)
class VideoPlan:
    """One subject (one frame folder) of the tree."""

    index: int  # position in the plan; seeds this video's RNG
    name: str  # e.g. "12-24-1920x1080" or "video7_left"
    split: str  # "train", "val" or "test" (held out), the same for every task
    tasks: tuple[str, ...]  # tasks that have an annotation file (test: whose test list has it)
    extra_lines: int  # annotation lines past the last frame slot
    final_newline: bool  # whether the annotation files end with a newline


_RESOLUTIONS = ("640x360", "640x480", "1280x720", "1920x1080", "480x360")
_FPS = (24, 25, 30, 60)


def _base_names(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct video names in the real styles ("12-24-1920x1080", "video7"); never a dot."""
    numbers = rng.permutation(np.arange(1, 10 * count + 10))[:count]
    names = []
    for number in numbers:
        if rng.random() < 0.6:
            names.append(f"{number}-{rng.choice(_FPS)}-{rng.choice(_RESOLUTIONS)}")
        else:
            names.append(f"video{number}")
    return names


def plan_tree(config: SynthConfig) -> list[VideoPlan]:
    """Decide every video's name, split and tree-level quirks from the seed (cheap, no I/O)."""
    rng = np.random.default_rng([config.seed, 0])
    n = config.videos
    pairs = max(1, n // 12)  # base videos split into _left and _right
    bases = n - pairs
    names = _base_names(rng, bases)
    paired = set(rng.choice(bases, size=pairs, replace=False).tolist())
    val = set(
        rng.choice(bases, size=min(bases - 1, max(1, round(0.25 * bases))), replace=False).tolist()
    )

    subjects: list[tuple[str, str]] = []  # (name, split)
    for b, name in enumerate(names):
        split = "val" if b in val else "train"
        suffixes = ("_left", "_right") if b in paired else ("",)
        subjects += [(name + suffix, split) for suffix in suffixes]

    missing = _choose_missing_tasks(rng, [split for _, split in subjects])
    extra = np.zeros(n, dtype=int)
    extra_videos = rng.choice(n, size=max(1, n // 4), replace=False)
    extra[extra_videos] = rng.integers(1, 6, size=len(extra_videos))
    no_newline = set(rng.choice(n, size=max(1, n // 5), replace=False).tolist())
    plans = [
        VideoPlan(
            index=i,
            name=name,
            split=split,
            tasks=tuple(t for t in TASKS if t != missing.get(i)),
            extra_lines=int(extra[i]),
            final_newline=i not in no_newline,
        )
        for i, (name, split) in enumerate(subjects)
    ]
    # The test set draws from a generator of its own: a tree's train and val stay the same bytes
    # whatever test_videos.
    return plans + _plan_test_set(config, plans) if config.test_videos else plans


def _plan_test_set(config: SynthConfig, plans: list[VideoPlan]) -> list[VideoPlan]:
    """``config.test_videos`` more subjects, split "test"; ``tasks`` = the challenge lists they are in.

    Names are new base videos (one split into _left/_right from 3 subjects on, as in the real
    lists). Each base video is in a random non-empty set of challenge lists and every list has a
    video, so the three lists differ as ABAW's do. Some have frames past the last image.
    """
    rng = np.random.default_rng([config.seed, 6])
    count = config.test_videos
    pair = count >= 3
    taken = {p.name.removesuffix("_left").removesuffix("_right") for p in plans}
    # Drawing len(taken) extra names leaves at least `bases` that are new.
    bases = [b for b in _base_names(rng, count - int(pair) + len(taken)) if b not in taken]
    bases = bases[: count - int(pair)]
    member = rng.random((len(bases), len(TASKS))) < 0.6
    for row in np.flatnonzero(~member.any(axis=1)):
        member[row, rng.integers(len(TASKS))] = True
    for column in np.flatnonzero(~member.any(axis=0)):
        member[rng.integers(len(bases)), column] = True
    subjects = []
    for b, base in enumerate(bases):
        suffixes = ("_left", "_right") if pair and b == 0 else ("",)
        subjects += [(base + suffix, b) for suffix in suffixes]
    extra = rng.integers(0, 6, size=len(subjects))
    return [
        VideoPlan(
            index=len(plans) + i,
            name=name,
            split="test",
            tasks=tuple(t for t, m in zip(TASKS, member[b]) if m),
            extra_lines=int(extra[i]),
            final_newline=True,
        )
        for i, (name, b) in enumerate(subjects)
    ]


def _choose_missing_tasks(rng: np.random.Generator, splits: list[str]) -> dict[int, str]:
    """About one video in eight lacks one task's file; every (task, split) keeps at least one video."""
    n = len(splits)
    have = {(task, split): splits.count(split) for task in TASKS for split in set(splits)}
    missing: dict[int, str] = {}
    want = max(1, n // 8)
    for i in rng.permutation(n).tolist():
        task = TASKS[rng.integers(len(TASKS))]
        if have[(task, splits[i])] > 1:
            missing[i] = task
            have[(task, splits[i])] -= 1
        if len(missing) == want:
            break
    return missing


# --- per-video labels: smooth along the video, from (seed, video) -------------------------------
@dataclass(frozen=True)
class VideoLabelsTruth:
    """The underlying labels of every frame slot (1..frames + extra_lines), what the image shows."""

    va: np.ndarray  # float64 L×2 in [-1, 1], rounded to 3 decimals (as written)
    expr: np.ndarray  # int64 L, 0..7
    au: np.ndarray  # int64 L×12, 0/1
    has_image: np.ndarray  # bool L; False for gaps and for lines past the last image


def _smooth_signal(rng: np.random.Generator, length: int) -> np.ndarray:
    """A slow sum of sinusoids around a random offset, clipped to [-1, 1] (a VA trace)."""
    t = np.arange(length, dtype=np.float64)
    signal = np.full(length, rng.uniform(-0.55, 0.55))
    for _ in range(3):
        period = rng.uniform(40, 400)  # frames
        signal += rng.uniform(0.1, 0.35) * np.sin(
            2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)
        )
    return np.clip(signal, -1.0, 1.0)


def _segments(rng: np.random.Generator, length: int, low: int, high: int) -> list[tuple[int, int]]:
    """Cut [0, length) into consecutive segments of random length in [low, high]."""
    cuts, start = [], 0
    while start < length:
        stop = min(length, start + int(rng.integers(low, high + 1)))
        cuts.append((start, stop))
        start = stop
    return cuts


# Segment lengths in frames (low, high): expression, AU on/off, and both on an onset-cue tree.
EXPR_SEGMENT = (8, 60)
AU_SEGMENT = (6, 50)
# Longer than smoothing.WINDOW_GRID's widest window (41), at most a 128-frame window stride
# (see the module docstring).
ONSET_SEGMENT = (48, 120)
MAX_ONSET_CUES = ONSET_SEGMENT[0] // 2


def _piecewise_expr(
    rng: np.random.Generator, length: int, lengths: tuple[int, int] = EXPR_SEGMENT
) -> np.ndarray:
    """Expression in constant segments, each a different class than the last (balanced overall)."""
    expr = np.empty(length, dtype=np.int64)
    previous = -1
    for start, stop in _segments(rng, length, *lengths):
        value = int(rng.integers(NUM_EXPR - (previous >= 0)))
        value += previous >= 0 and value >= previous  # skip the previous class
        expr[start:stop] = previous = value
    return expr


def _on_off_au(rng: np.random.Generator, length: int, onset_cues: bool = False) -> np.ndarray:
    """Each AU in on/off segments, on about 40-55% of the time.

    ``onset_cues``: segments of :data:`ONSET_SEGMENT` frames that alternate on and off (the first
    one on with the AU's probability), so every "on" run is one segment with an onset of its own
    and is never longer than ONSET_SEGMENT's high end.
    """
    au = np.empty((length, NUM_AU), dtype=np.int64)
    for k in range(NUM_AU):
        p_on = rng.uniform(0.4, 0.55)
        if onset_cues:
            on = rng.random() < p_on
            for start, stop in _segments(rng, length, *ONSET_SEGMENT):
                au[start:stop, k] = on
                on = not on
            continue
        for start, stop in _segments(rng, length, *AU_SEGMENT):
            au[start:stop, k] = rng.random() < p_on
    return au


def _gaps(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Frames with no image: short runs (1-4 frames) covering about 3% of the video."""
    has_image = np.ones(frames, dtype=bool)
    for _ in range(max(1, round(0.03 * frames / 2.5))):
        start = int(rng.integers(frames))
        has_image[start : start + int(rng.integers(1, 5))] = False
    return has_image


def video_labels(seed: int, plan: VideoPlan, frames: int, onset_cues: int = 0) -> VideoLabelsTruth:
    """The underlying labels of one video, from (seed, video index) alone.

    With ``onset_cues`` > 0 (SynthConfig.onset_cues) expression and AU segments are
    :data:`ONSET_SEGMENT` frames long and AU segments alternate on and off; valence, arousal and
    the gaps are the same as without.
    """
    rng = np.random.default_rng([seed, 1, plan.index])
    length = frames + plan.extra_lines
    va = np.round(np.stack([_smooth_signal(rng, length), _smooth_signal(rng, length)], axis=1), 3)
    has_image = np.zeros(length, dtype=bool)
    has_image[:frames] = _gaps(rng, frames)
    return VideoLabelsTruth(
        va=va,
        expr=_piecewise_expr(rng, length, ONSET_SEGMENT if onset_cues else EXPR_SEGMENT),
        au=_on_off_au(rng, length, onset_cues > 0),
        has_image=has_image,
    )


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """The [start, stop) runs of equal consecutive values of a 1-d array."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    edges = [0, *cuts.tolist(), len(values)]
    return list(zip(edges[:-1], edges[1:]))


def cue_visibility(truth: VideoLabelsTruth, onset_cues: int) -> tuple[np.ndarray, np.ndarray]:
    """Which frame slots show their expression cue (bool L), and how each AU's marks show (int8
    L×12: :data:`MARK_HIDDEN`, :data:`MARK_COLOUR` or :data:`MARK_DARK`).

    ``onset_cues`` 0: every frame shows everything (an active AU's marks in its colour). K > 0: the
    disc shows its class on the first K frames of each expression segment (a run of one class); AU
    k's marks show in its colour on the first K frames of each "on" run (onset) and in black on its
    last K frames (offset: so the end of a run looks unlike its start and a sequence model knows
    which side of a run it is on; marks alike at both ends would leave on and off runs
    indistinguishable between them). Marks never show in an "off" run, so a shown mark, coloured
    or black, always means "on" and a per-frame model learns to see both cues.
    """
    length = len(truth.expr)
    if onset_cues == 0:
        return np.ones(length, dtype=bool), np.full((length, NUM_AU), MARK_COLOUR, np.int8)
    expr = np.zeros(length, dtype=bool)
    for start, _ in _runs(truth.expr):
        expr[start : start + onset_cues] = True
    au = np.full((length, NUM_AU), MARK_HIDDEN, np.int8)
    for k in range(NUM_AU):
        for start, stop in _runs(truth.au[:, k]):
            if truth.au[start, k] == 1:
                au[max(start, stop - onset_cues) : stop, k] = MARK_DARK
                au[start : start + onset_cues, k] = MARK_COLOUR
    return expr, au


# --- annotation files ---------------------------------------------------------------------------
def _ignore_runs(rng: np.random.Generator, length: int) -> list[tuple[int, int]]:
    """One or more runs of frames (about 2-5% of the video each) whose label is marked ignored."""
    runs = []
    for _ in range(1 + int(rng.poisson(length / 400))):
        run = int(rng.integers(2, max(3, length // 20) + 1))
        start = int(rng.integers(0, max(1, length - run)))
        runs.append((start, start + run))
    return runs


def annotation_lines(seed: int, plan: VideoPlan, truth: VideoLabelsTruth, task: str) -> list[str]:
    """The lines of one task's annotation file (header included), with runs of ignore markers."""
    rng = np.random.default_rng([seed, 2, plan.index, TASKS.index(task)])
    length = len(truth.expr)
    if task == "va":
        rows = [f"{v:.3f},{a:.3f}" for v, a in truth.va]
        for r, (start, stop) in enumerate(_ignore_runs(rng, length)):
            # The first run cycles by video so every kind occurs: both values, valence, arousal.
            which = (plan.index + r) % 3 if r == 0 else int(rng.integers(3))
            for i in range(start, stop):
                v, a = rows[i].split(",")
                rows[i] = ",".join(
                    [
                        f"{VA_IGNORE:g}" if which in (0, 1) else v,
                        f"{VA_IGNORE:g}" if which in (0, 2) else a,
                    ]
                )
    elif task == "expr":
        rows = [str(e) for e in truth.expr]
        for start, stop in _ignore_runs(rng, length):
            rows[start:stop] = [str(EXPR_IGNORE)] * (stop - start)
    else:
        rows = [",".join(str(x) for x in row) for row in truth.au]
        for start, stop in _ignore_runs(rng, length):
            rows[start:stop] = [",".join([str(AU_IGNORE)] * NUM_AU)] * (stop - start)
    return [",".join(HEADERS[task])] + rows


def annotation_path(root: Path, task: str, split: str, video: str) -> Path:
    """Where one video's annotation file for ``task`` lives in a synthetic tree."""
    return root / ANNOTATIONS_DIR / TASK_DIRS[task] / SET_DIRS[split] / f"{video}.txt"


def _write_annotations(root: Path, seed: int, plan: VideoPlan, truth: VideoLabelsTruth) -> None:
    for task in plan.tasks:
        path = annotation_path(root, task, plan.split, plan.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(annotation_lines(seed, plan, truth, task))
        path.write_bytes((text + ("\n" if plan.final_newline else "")).encode())


def write_test_lists(root: Path, plans: list[VideoPlan], frames: int) -> None:
    """The ABAW test-set files of the held-out videos (split "test") under ``root/test_lists``.

    One list per challenge (:data:`TEST_LISTS`), one video name per line, sorted; and
    ``frame_counts.csv`` (``video,frames``): each test video's length in frames, images or not,
    which a submission needs since no annotation file gives it.
    """
    folder = root / TEST_LISTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    test = [p for p in plans if p.split == "test"]
    for task, name in TEST_LISTS.items():
        names = sorted(p.name for p in test if task in p.tasks)
        (folder / name).write_bytes("".join(f"{n}\n" for n in names).encode())
    rows = [f"{p.name},{frames + p.extra_lines}\n" for p in sorted(test, key=lambda p: p.name)]
    (folder / FRAME_COUNTS_FILE).write_bytes(("video,frames\n" + "".join(rows)).encode())


# --- drawing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceStyle:
    """One video's look: small jitter that a model must see past."""

    centre: tuple[float, float]  # face centre, normalized
    scale: float  # face size factor
    tint: np.ndarray  # float32 3, zero-sum background tint (keeps the grey level)
    skin: np.ndarray  # float32 3, skin hue with channel mean 1
    noise: float  # pixel noise std, in [0, 1] units


def video_style(seed: int, plan: VideoPlan) -> FaceStyle:
    """The look of one video, from (seed, video index) alone."""
    rng = np.random.default_rng([seed, 3, plan.index])
    tint = rng.uniform(-0.04, 0.04, 3)
    skin = np.array([1.25, 0.95, 0.8]) + rng.uniform(-0.06, 0.06, 3)
    return FaceStyle(
        centre=tuple(rng.uniform(-0.025, 0.025, 2)),
        scale=float(rng.uniform(0.96, 1.04)),
        tint=(tint - tint.mean()).astype(np.float32),
        skin=(skin / skin.mean()).astype(np.float32),
        noise=float(rng.uniform(2, 5) / 255),
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized coordinates of the pixel centres (x right, y down)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(axis, axis, indexing="xy")


def _coverage(distance: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape from a signed distance in normalized units."""
    return np.clip(0.5 - distance * (size / 2), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class FaceMasks:
    """Coverage masks of one video's shapes, computed once per video and size."""

    face: np.ndarray  # float32 H×W×1
    disc: np.ndarray  # float32 H×W×1
    mark_id: np.ndarray  # intp H×W: the AU whose mark covers the pixel, NUM_AU for none
    mark_cover: np.ndarray  # float32 H×W×1, coverage of that mark
    mark_rgb: np.ndarray  # float32 H×W×3, its colour premultiplied by the coverage


def face_masks(style: FaceStyle, size: int) -> FaceMasks:
    """Draw the shapes of one video's face at ``size`` pixels."""
    x, y = _grid(size)
    cx, cy = style.centre
    s = style.scale
    ax, ay = FACE_AXES[0] * s, FACE_AXES[1] * s
    face = (np.hypot((x - cx) / ax, (y - cy) / ay) - 1) * min(ax, ay)
    disc = np.hypot(x - cx, y - cy) - DISC_RADIUS * s
    marks = []
    for px, py in AU_POSITIONS:
        pair = np.minimum(
            np.hypot(x - cx - px * s, y - cy - py * s), np.hypot(x - cx + px * s, y - cy - py * s)
        )
        marks.append(_coverage(pair - MARK_RADIUS * s, size))
    marks = np.stack(marks)
    # Marks never overlap (not even their anti-aliased edges), so one id per pixel is enough and
    # a frame costs O(pixels) whatever the number of AUs that are on.
    cover = marks.max(axis=0)
    mark_id = np.where(cover > 0, marks.argmax(axis=0), NUM_AU)
    colours = np.concatenate([MARK_COLOURS, np.zeros((1, 3), np.float32)])
    return FaceMasks(
        face=_coverage(face, size)[..., None],
        disc=_coverage(disc, size)[..., None],
        mark_id=mark_id,
        mark_cover=cover[..., None],
        mark_rgb=colours[mark_id] * cover[..., None],
    )


def draw_frame(
    masks: FaceMasks, style: FaceStyle, va, expr: int, au, noise: np.ndarray
) -> np.ndarray:
    """One frame as uint8 H×W×3: the labels drawn into the face (see the module docstring).

    ``expr`` :data:`NO_CUE` draws the neutral disc; ``au`` per AU :data:`MARK_HIDDEN` (0: the AU
    is off, or its marks are hidden), :data:`MARK_COLOUR` (1) or :data:`MARK_DARK` (2: black).
    """
    valence, arousal = va
    image = np.broadcast_to(
        np.float32(background_level(valence)) + style.tint, masks.face.shape[:2] + (3,)
    )
    image = image + (np.float32(skin_level(arousal)) * style.skin - image) * masks.face
    disc = NEUTRAL_DISC if expr == NO_CUE else EXPR_COLOURS[expr]
    image += (disc - image) * masks.disc
    kind = np.append(np.asarray(au), MARK_HIDDEN)[masks.mark_id][..., None]  # H×W×1
    covered = image * (1 - masks.mark_cover)
    image = np.where(kind == MARK_COLOUR, covered + masks.mark_rgb, image)
    image = np.where(kind == MARK_DARK, covered, image)
    image += noise
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


# --- corrupted frames (noisy_frames): cues hidden or distorted, labels untouched -----------------
CORRUPTIONS = ("occlusion", "exposure", "blur")


def _corruption_draw(
    seed: int, index: int, frame: int, fraction: float
) -> tuple[str | None, np.random.Generator]:
    """Whether and how a frame is corrupted, and the generator that then draws the details."""
    # A stream of its own per (seed, video, frame): independent of chunking and of the pixel noise.
    rng = np.random.default_rng([seed, 5, index, frame])
    if rng.random() >= fraction:
        return None, rng
    return CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))], rng


def frame_corruption(seed: int, plan: VideoPlan, frame: int, fraction: float) -> str | None:
    """The corruption (one of :data:`CORRUPTIONS`) that 1-based ``frame`` of ``plan`` gets, or None."""
    return _corruption_draw(seed, plan.index, frame, fraction)[0]


def corrupt_frame(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A uint8 H×W×3 frame with its cues hidden or distorted in a way that ignores its labels.

    - occlusion: an opaque rectangle of random colour over part of the face, as a hand or an
      object in front of it (hides the disc, marks or a readout patch);
    - exposure: a strong brightness jump and contrast change of the whole frame (shifts the grey
      levels that carry valence and arousal, and the colours of the disc and marks);
    - blur: a Gaussian blur of 2-5% of the frame size (washes out the marks).
    """
    size = image.shape[0]
    if kind == "occlusion":
        width, height = rng.uniform(0.5, 1.1, 2)  # normalized units: the frame spans 2
        cx, cy = rng.uniform(-0.45, 0.45, 2)
        x0, x1 = (np.clip([cx - width / 2, cx + width / 2], -1, 1) + 1) / 2 * size
        y0, y1 = (np.clip([cy - height / 2, cy + height / 2], -1, 1) + 1) / 2 * size
        image = image.copy()
        image[round(y0) : round(y1), round(x0) : round(x1)] = rng.integers(0, 256, 3)
        return image
    if kind == "exposure":
        offset = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.4)  # in [0, 1] units
        gain = rng.uniform(0.7, 1.3)
        levels = (image / 255.0 - 0.5) * gain + 0.5 + offset
        return (np.clip(levels, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    radius = rng.uniform(0.02, 0.05) * size  # pixels
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of a uint8 H×W×3 image (PIL, quality 90, as the real crops roughly are)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def frame_path(root: Path, video: str, frame: int) -> Path:
    """The image of 1-based ``frame`` of ``video`` in a tree."""
    return image_path(root / FRAMES_DIR, video, frame)


@dataclass(frozen=True)
class _Chunk:
    """A run of frames of one video: the unit of parallel work."""

    root: Path
    seed: int
    size: int
    plan: VideoPlan
    style: FaceStyle
    frames: np.ndarray  # 1-based numbers of the frames to draw
    va: np.ndarray
    expr: np.ndarray  # the cue drawn: the class, or NO_CUE where it is hidden (onset_cues)
    au: np.ndarray  # the marks drawn: 1 where the AU is on and its marks show
    noisy_frames: float  # fraction of frames corrupted (SynthConfig.noisy_frames)


def _draw_chunk(chunk: _Chunk) -> int:
    """Draw and write a chunk's frames; each frame's noise is seeded by (seed, video, frame)."""
    masks = face_masks(chunk.style, chunk.size)
    shape = (chunk.size, chunk.size, 3)
    for frame, va, expr, au in zip(chunk.frames, chunk.va, chunk.expr, chunk.au):
        rng = np.random.default_rng([chunk.seed, 4, chunk.plan.index, int(frame)])
        # Uniform noise with the style's std: cheaper to draw than Gaussian, looks the same.
        amplitude = np.float32(chunk.style.noise * 12**0.5)
        noise = (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * amplitude
        image = draw_frame(masks, chunk.style, va, int(expr), au, noise)
        if chunk.noisy_frames > 0:  # 0: not a single extra draw, so the default tree is unchanged
            kind, detail = _corruption_draw(
                chunk.seed, chunk.plan.index, int(frame), chunk.noisy_frames
            )
            if kind is not None:
                image = corrupt_frame(image, kind, detail)
        frame_path(chunk.root, chunk.plan.name, int(frame)).write_bytes(encode_jpeg(image))
    return len(chunk.frames)


def _chunks(config: SynthConfig, plan: VideoPlan, truth: VideoLabelsTruth, per_chunk: int):
    """Split one video's frames with an image into chunks of at most ``per_chunk`` frames."""
    style = video_style(config.seed, plan)
    slots = np.flatnonzero(truth.has_image)
    expr_shown, au_shown = cue_visibility(truth, config.onset_cues)
    expr = np.where(expr_shown, truth.expr, NO_CUE)
    au = truth.au * au_shown  # MARK_* where the AU is active, 0 (hidden) where not
    for start in range(0, len(slots), per_chunk):
        idx = slots[start : start + per_chunk]
        yield _Chunk(
            root=config.out,
            seed=config.seed,
            size=config.image_size,
            plan=plan,
            style=style,
            frames=idx + 1,
            va=truth.va[idx],
            expr=expr[idx],
            au=au[idx],
            noisy_frames=config.noisy_frames,
        )


# --- the whole tree -----------------------------------------------------------------------------
def _check_out(config: SynthConfig) -> None:
    out = config.out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(
            f"{out} is not empty (pass overwrite=True / --overwrite to write into it)"
        )


def synthesize(config: SynthConfig, progress: bool = False) -> Path:
    """Write the synthetic tree described by ``config`` and return its root (``config.out``).

    Annotations are written first by this process (cheap); frames are drawn by a pool of
    ``config.workers`` processes in chunks. ``progress`` shows a tqdm bar (frames/s) on stderr.
    """
    _check_out(config)
    plans = plan_tree(config)
    chunks = []
    for plan in plans:
        truth = video_labels(config.seed, plan, config.frames, config.onset_cues)
        if plan.split != "test":  # the test set's labels are written nowhere
            _write_annotations(config.out, config.seed, plan, truth)
        (config.out / FRAMES_DIR / plan.name).mkdir(parents=True, exist_ok=True)
        chunks += _chunks(config, plan, truth, per_chunk=100)
    if config.test_videos:
        write_test_lists(config.out, plans, config.frames)
    total = sum(len(c.frames) for c in chunks)
    with tqdm(total=total, unit="frame", desc="synth", disable=not progress, smoothing=0.1) as bar:
        if config.workers == 1:
            for chunk in chunks:
                bar.update(_draw_chunk(chunk))
        else:
            # fork: workers need only numpy and PIL, and start in milliseconds.
            with multiprocessing.get_context("fork").Pool(min(config.workers, len(chunks))) as pool:
                for done in pool.imap_unordered(_draw_chunk, chunks):
                    bar.update(done)
    return config.out


# --- reading the labels back from the pixels (for tests and sanity checks) --------------------
def _patch_mean(image: np.ndarray, patch: tuple[float, float, float, float]) -> np.ndarray:
    """Mean RGB in [0, 1] of a normalized rectangle (x0, x1, y0, y1) of an H×W×3 image."""
    h, w = image.shape[:2]
    x0, x1, y0, y1 = patch

    def pixels(low: float, high: float, n: int) -> slice:  # at least one pixel wide
        start = int(round((low + 1) / 2 * n))
        return slice(start, max(start + 1, int(round((high + 1) / 2 * n))))

    return image[pixels(y0, y1, h), pixels(x0, x1, w)].reshape(-1, 3).mean(axis=0) / 255.0


def labels_from_pixels(image: np.ndarray) -> dict[str, np.ndarray]:
    """Read (va, expr, au) back from an unrotated synthetic frame (any size >= 32 px, flipped or not).

    Valence and arousal come back within a few hundredths; expression and AUs exactly. What comes
    back is the cue the frame shows: on an onset-cue tree (SynthConfig.onset_cues) a frame whose
    cues are hidden (:func:`cue_visibility`) reads expression :data:`NO_CUE` (the neutral disc)
    and 0 for each AU whose marks are hidden, whatever its label.
    """
    image = np.asarray(image)
    grey = np.mean([_patch_mean(image, p).mean() for p in VALENCE_PATCHES])
    skin = np.mean([_patch_mean(image, p).mean() for p in AROUSAL_PATCHES])
    va = np.array([(grey - 0.5) / 0.4, (skin - 0.5) / 0.3])
    centre = _patch_mean(image, (-0.08, 0.08, -0.08, 0.08))
    expr = int(np.argmin(np.square(EXPR_COLOURS - centre).sum(axis=1)))
    # Tight, so that a class colour under a corrupted exposure or a blur still reads as its class.
    if np.linalg.norm(centre - NEUTRAL_DISC) < NEUTRAL_READ_DISTANCE:
        expr = NO_CUE
    au = np.array([_mark_present(image, k) for k in range(NUM_AU)], dtype=np.int64)
    return {"va": np.clip(va, -1, 1), "expr": np.int64(expr), "au": au}


def _mark_present(image: np.ndarray, k: int) -> bool:
    """Whether both marks of AU k show near their nominal place (searching past jitter), in its
    colour or in black (an onset-cue tree's offset)."""
    h, w = image.shape[:2]
    x, y = AU_POSITIONS[k]
    pixels = image.astype(np.float32) / 255.0
    coloured = np.linalg.norm(pixels - MARK_COLOURS[k], axis=-1) < 0.3
    dark = np.linalg.norm(pixels, axis=-1) < DARK_READ_DISTANCE
    gx, gy = _grid(w)[0][0], _grid(h)[1][:, 0]
    found = {"colour": [], "dark": []}
    for px in (x, -x):
        near = (np.abs(gx - px) <= 0.05)[None, :] & (np.abs(gy - y) <= 0.05)[:, None]
        found["colour"].append(bool(near.any()) and bool(coloured[near].any()))
        found["dark"].append(bool(near.any()) and bool(dark[near].any()))
    return all(found["colour"]) or all(found["dark"])
