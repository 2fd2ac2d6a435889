"""The Aff-Wild2 reader: find the annotation folders and frames, parse and join the three tasks.

The input tree is described in docs/design.md §1. The reader does three things:

1. :func:`find_annotation_dirs` locates ``cropped_aligned`` and the challenge folders under a root
   (a few levels down, never walking into the 2.8M-frame folder), or takes each explicitly.
2. :func:`read_tree` parses every ``<Challenge>/{Train_Set,Validation_Set}/<video>.txt`` of the
   requested tasks, checks headers and values, joins the tasks per (video, frame) and keeps the
   frames that have an image and at least one valid label.
3. :func:`image_path` and :func:`sample_key` name a frame's image and its shard key.
4. :func:`read_test_set` reads ABAW test-set lists (video names, no labels): every frame with an
   image of each listed video, for the unlabelled ``test`` split.

Per-frame data lives only in the numpy arrays of :class:`VideoLabels` (about 25 bytes per frame,
70 MB for the 2.8M frames of the real dataset). Parsing uses ``np.fromstring`` on a whole file at
once and falls back to a line-by-line pass only to name the line of a bad value. Fields that
``np.fromstring`` would read as 0 though they hold no digit (empty, blank, a lone sign) are found
first with byte searches over the whole body, so they are errors, never labels.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import warnings
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm import tqdm

from affectfast.errors import DataError
from affectfast.safe_files import excerpt, read_bytes
from affectfast.shards import KEY_RULE, MAX_FRAME_COUNT, MAX_KEY, check_key
from affectfast.tasks import (
    AU_IGNORE,
    AU_NAMES,
    CHALLENGE_DIRS,
    EXPR_IGNORE,
    HEADERS,
    LABEL_SIZE,
    NUM_AU,
    NUM_EXPR,
    SPLIT_DIRS,
    TASKS,
    VA_IGNORE,
    VA_NAMES,
    parse_tasks,
    valid_mask,
)

FRAMES_DIR = "cropped_aligned"
# How deep below the root the folders may sit: root/Third ABAW Annotations/VA_Estimation_Challenge
# is depth 2. Three levels cover every release layout seen while keeping the search cheap.
SEARCH_DEPTH = 3
FRAME_DIGITS = 5  # frame images are <NNNNN>.jpg, 1-based
QUOTE_LIMIT = 80  # characters of file content an error quotes: a broken file may hold a 50 MB line
# The most an annotation file or a test list may hold: 99,999 frames of twelve AU values take
# about 2.5 MB; anything past this is not such a file (and a device never ends).
MAX_ANNOTATION_BYTES = 64 << 20
MAX_TEST_LIST_BYTES = 64 << 20
MAX_VIDEO_NAME = MAX_KEY - 1 - FRAME_DIGITS  # "<video>/<NNNNN>" fits a key


@dataclass(frozen=True)
class AnnotationDirs:
    """The challenge folders of a tree, one per task; None where the tree lacks that task."""

    frames: Path  # the cropped_aligned folder: <frames>/<video>/<NNNNN>.jpg
    va: Path | None = None  # .../VA_Estimation_Challenge
    expr: Path | None = None  # .../EXPR_Recognition_Challenge or EXPR_Classification_Challenge
    au: Path | None = None  # .../AU_Detection_Challenge

    def __post_init__(self):
        # Accept str paths from callers; store Path so comparisons and joins behave.
        for name in ("frames", *TASKS):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    def task_dir(self, task: str) -> Path | None:
        """The challenge folder of ``task`` ("va", "expr" or "au"), or None."""
        return getattr(self, task)


@dataclass
class VideoLabels:
    """Every usable frame of one video (one subject), columnar so 2.8M frames stay small in memory.

    A frame is kept when its image exists and at least one task's label is valid.
    Arrays all have length N (number of kept frames), sorted by frame number.
    """

    name: str  # e.g. "10-60-1280x720_right"; the folder under cropped_aligned
    split: str  # "train" or "val"
    frames: np.ndarray  # int32 N, 1-based frame numbers (image = <frames>/<name>/<NNNNN>.jpg)
    va: np.ndarray  # float32 N×2, NaN where VA is ignored or absent
    expr: np.ndarray  # int8 N, -1 where ignored or absent
    au: np.ndarray  # int8 N×12, a row of -1 where ignored or absent
    ignored_files: int = 0  # entries of the frames folder that are not frames (hidden ones aside)
    # Frames of the video by its annotation files: lines after the header (the longest file of the
    # video's tasks), images or not. 0 where unknown (a test video has no annotation file).
    frame_count: int = 0

    def __len__(self) -> int:
        return len(self.frames)


# --- naming ---------------------------------------------------------------------------------------


def image_path(frames_dir: str | Path, video: str, frame: int) -> Path:
    """The image of 1-based ``frame`` of ``video``: ``<frames_dir>/<video>/<NNNNN>.jpg``."""
    return Path(frames_dir) / video / f"{frame:0{FRAME_DIGITS}d}.jpg"


def sample_key(video: str, frame: int) -> str:
    """The shard key ``<video>/<NNNNN>`` of a frame; a video name the key rule refuses
    (``shards.KEY_RULE``: no dot, slash, colon or space, ...) is a DataError."""
    _check_video_name(video, Path(video))
    if not 1 <= frame < 10**FRAME_DIGITS:
        raise ValueError(f"frame {frame} outside 1..{10**FRAME_DIGITS - 1}")
    return f"{video}/{frame:0{FRAME_DIGITS}d}"


def _check_video_name(video: str, path: Path, frames: Path | None = None) -> None:
    """Refuse a video name that cannot make shard keys, naming ``path`` (and its frames folder)."""
    if not check_key(f"{video}/{1:0{FRAME_DIGITS}d}"):
        folder = f" (frames folder {frames / video})" if frames is not None else ""
        raise DataError(
            path, f"video name {video!r} cannot be packed{folder}: {KEY_RULE}; rename the video"
        )


# --- the source fingerprint (recorded by pack, checked by the files loader) -----------------------


def fingerprint_source(
    dirs: AnnotationDirs, videos: list[str], test_names: dict[str, list[str]] | None = None
) -> str:
    """sha256 over every annotation file (name and bytes), the image names of each video and the
    videos of each task's test list (``test_names``; none: the digest of a pack without them)."""
    return _fingerprints(dirs, videos, test_names)[0]


def fingerprint_sources(
    dirs: AnnotationDirs, labelled: list[str], test_names: dict[str, list[str]]
) -> tuple[str, str]:
    """(the fingerprint of the labelled part alone, that of the whole source), reading each file
    once: the first is what a pack without test lists records (``fingerprint_source(dirs,
    labelled)``), the second adds the test videos' image names and the lists."""
    listed = {name for names in test_names.values() for name in names}
    videos = sorted(set(labelled) | listed)
    whole, part = _fingerprints(dirs, videos, test_names or None, part=set(labelled))
    return part, whole


def _fingerprints(
    dirs: AnnotationDirs,
    videos: list[str],
    test_names: dict[str, list[str]] | None,
    part: set[str] | None = None,
) -> list[str]:
    """The fingerprint of ``videos`` (and ``test_names``) and, with ``part``, that of the
    annotations and the videos in ``part`` alone, as ``fingerprint_source`` would give it."""
    digests = [hashlib.sha256()] + ([hashlib.sha256()] if part is not None else [])

    def add(text: str, data: bytes = b"", whole_only: bool = False) -> None:
        # Length-prefixed so that no two different sources can hash the same stream.
        for digest in digests[:1] if whole_only else digests:
            for item in (text.encode(), data):
                digest.update(len(item).to_bytes(8, "little"))
                digest.update(item)

    for task in TASKS:
        folder = dirs.task_dir(task)
        for set_dir in SPLIT_DIRS if folder is not None else ():
            if not (folder / set_dir).is_dir():
                continue
            for name in sorted(
                n
                for n in os.listdir(folder / set_dir)
                if n.endswith(".txt") and not n.startswith(".")
            ):
                add(f"{task}/{set_dir}/{name}", _read_annotation(folder / set_dir / name))
    for video in videos:
        listing = "\n".join(sorted(os.listdir(dirs.frames / video))).encode()
        add(video, listing, whole_only=part is not None and video not in part)
    for task, names in sorted((test_names or {}).items()):
        add(f"test list {task}", "\n".join(names).encode(), whole_only=True)
    return ["sha256:" + digest.hexdigest() for digest in digests]


# --- finding the folders --------------------------------------------------------------------------


def find_annotation_dirs(
    root: str | Path | None,
    *,
    frames: str | Path | None = None,
    va: str | Path | None = None,
    expr: str | Path | None = None,
    au: str | Path | None = None,
) -> AnnotationDirs:
    """Locate ``cropped_aligned`` and the challenge folders under ``root``; explicit ones win.

    Searches up to :data:`SEARCH_DEPTH` levels below ``root`` and never walks into a frames or
    challenge folder. A task found nowhere gives None; no frames folder, no task at all, or two
    folders for one task is a DataError.
    """
    found = {
        what: _given_dir(what, path)
        for what, path in {"frames": frames, "va": va, "expr": expr, "au": au}.items()
    }
    if root is not None and None in found.values():
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "the tree root does not exist or is not a folder")
        for what, paths in _search(root).items():
            if found[what] is None and paths:
                if len(paths) > 1:
                    raise DataError(
                        paths[0],
                        f"two {what} folders: {paths[0]} and {paths[1]}; "
                        "pass the one to use explicitly",
                    )
                found[what] = paths[0]
    _check_found(Path(root) if root is not None else found["frames"] or Path("."), found)
    return AnnotationDirs(**found)


def _given_dir(what: str, path: str | Path | None) -> Path | None:
    """An explicitly given folder as a Path, refused if it is not a folder."""
    if path is not None and not Path(path).is_dir():
        raise DataError(path, f"the {what} folder given does not exist or is not a folder")
    return None if path is None else Path(path)


def _check_found(where: Path, found: dict[str, Path | None]) -> None:
    """Refuse a tree without frames, without any task, or with a challenge folder lacking sets."""
    if found["frames"] is None:
        raise DataError(
            where,
            f"no {FRAMES_DIR} folder within {SEARCH_DEPTH} levels; expected "
            f"{FRAMES_DIR}/<video>/<NNNNN>.jpg (or pass the frames folder)",
        )
    if all(found[task] is None for task in TASKS):
        names = ", ".join(name for task in TASKS for name in CHALLENGE_DIRS[task])
        raise DataError(
            where,
            f"no annotation folder within {SEARCH_DEPTH} levels; expected one "
            f"of {names} (or pass them explicitly)",
        )
    for task in TASKS:
        path = found[task]
        if path is not None and not any((path / s).is_dir() for s in SPLIT_DIRS):
            raise DataError(path, f"expected a {' or '.join(SPLIT_DIRS)} folder inside")


def _search(root: Path) -> dict[str, list[Path]]:
    """Breadth-first search for frames and challenge folders; returns every match per target."""
    targets = {FRAMES_DIR: "frames"}
    targets.update({name: task for task, names in CHALLENGE_DIRS.items() for name in names})
    found: dict[str, list[Path]] = {"frames": [], **{task: [] for task in TASKS}}
    level = [root]
    for _ in range(SEARCH_DEPTH):
        deeper = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    subdirs = sorted(
                        e.name for e in entries if not e.name.startswith(".") and e.is_dir()
                    )
            except OSError:  # unreadable folder: nothing of ours can be inside
                continue
            for name in subdirs:
                if name in targets:  # never walk into a match: cropped_aligned holds 2.8M files
                    found[targets[name]].append(folder / name)
                else:
                    deeper.append(folder / name)
        level = deeper
    return found


# --- reading the tree -----------------------------------------------------------------------------


def read_tree(
    dirs: AnnotationDirs, tasks: str | tuple[str, ...] = TASKS, *, progress: bool = False
) -> list[VideoLabels]:
    """Parse and join the annotations of ``tasks``; one VideoLabels per video, sorted by name.

    Only the requested tasks are read (the others stay ignored in the arrays). Videos with no
    kept frame are left out. Bad input, train/val leakage and annotation files without a frames
    folder raise DataError before anything is returned.
    """
    tasks = parse_tasks(tasks)
    present = [t for t in tasks if dirs.task_dir(t) is not None]
    if not present:
        raise DataError(
            dirs.frames, f"none of the requested tasks ({','.join(tasks)}) has an annotation folder"
        )
    index = _index_annotations(dirs, present)
    videos = []
    for video in tqdm(
        sorted(index), desc="reading annotations", unit="video", disable=not progress
    ):
        split, files = index[video]
        labels = _read_video(dirs.frames, video, split, files)
        if len(labels):
            videos.append(labels)
    return videos


def _index_annotations(
    dirs: AnnotationDirs, tasks: list[str]
) -> dict[str, tuple[str, dict[str, Path]]]:
    """Map video -> (split, {task: annotation file}); refuse leakage, dots and missing frames."""
    where: dict[str, dict[str, tuple[str, Path]]] = {}
    for task in tasks:
        for set_dir, split in SPLIT_DIRS.items():
            folder = dirs.task_dir(task) / set_dir
            if not folder.is_dir():
                continue
            with os.scandir(folder) as entries:
                names = sorted(
                    e.name
                    for e in entries
                    if e.name.endswith(".txt") and not e.name.startswith(".")
                )
            for name in names:
                path = folder / name
                video = name[: -len(".txt")]
                _check_video_name(video, path, dirs.frames)
                seen = where.setdefault(video, {})
                if task in seen:
                    raise DataError(
                        path,
                        f"video {video} is also annotated in {seen[task][1]}: train/val leakage",
                    )
                seen[task] = (split, path)
    index = {}
    for video, seen in where.items():
        (split, path), *others = seen.values()
        for other_split, other in others:
            if other_split != split:
                raise DataError(
                    path,
                    f"video {video} is in {split} here and in {other_split} in "
                    f"{other}: train/val leakage",
                )
        if not (dirs.frames / video).is_dir():
            raise DataError(
                path, f"no frames folder {dirs.frames / video} for this annotation file"
            )
        index[video] = (split, {task: p for task, (_, p) in seen.items()})
    return index


def _read_video(frames_dir: Path, video: str, split: str, files: dict[str, Path]) -> VideoLabels:
    """Join one video's task files with its images; keep frames with an image and a valid label."""
    folder = frames_dir / video
    frames, ignored = _frames_of(folder)
    if not len(frames):
        raise DataError(
            folder,
            f"no frame image (a regular file named NNNNN.jpg) for the annotations in "
            f"{next(iter(files.values()))}; {len(ignored)} other entries{_example(ignored)}",
        )
    columns = _ignored_columns(len(frames))
    keep = np.zeros(len(frames), dtype=bool)
    frame_count = 0
    for task, path in files.items():
        per_line = _parse_annotation(path, task)  # row i = frame i+1
        frame_count = max(frame_count, len(per_line))
        # Images past the last annotation line have no label; lines past the last image are unused.
        labelled = frames <= len(per_line)
        columns[task][labelled] = per_line[frames[labelled] - 1]
        keep |= valid_mask(task, columns[task])
    return VideoLabels(
        name=video,
        split=split,
        frames=frames[keep],
        **{task: column[keep] for task, column in columns.items()},
        ignored_files=len(ignored),
        frame_count=frame_count,
    )


def _frames_of(folder: Path) -> tuple[np.ndarray, list[str]]:
    """:func:`_list_frames`, saying on stderr what in the folder is not a frame."""
    frames, ignored = _list_frames(folder)
    if ignored:  # not frames, maybe meant as frames: never drop them without a word
        tqdm.write(
            f"ignored {len(ignored)} {'entry' if len(ignored) == 1 else 'entries'} in {folder} "
            f"that are not frames (regular files named NNNNN.jpg){_example(ignored)}",
            file=sys.stderr,
        )
    return frames, ignored


def _example(names: list[str]) -> str:
    return f", e.g. {min(names)!r}" if names else ""


def _ignored_columns(n: int) -> dict[str, np.ndarray]:
    """Label arrays of ``n`` frames, every label ignored (the in-memory encoding of tasks.py)."""
    return {
        "va": np.full((n, 2), np.nan, dtype=np.float32),
        "expr": np.full(n, EXPR_IGNORE, dtype=np.int8),
        "au": np.full((n, NUM_AU), AU_IGNORE, dtype=np.int8),
    }


def _list_frames(video_dir: Path) -> tuple[np.ndarray, list[str]]:
    """Sorted 1-based frame numbers of the regular ``<NNNNN>.jpg`` files in a folder, and the names
    of its other entries, hidden ones aside (``000001.jpg``, ``00001.JPG``: files meant as frames)."""
    # os.scandir's entries carry the file type from the directory listing (no stat per file on
    # common filesystems): a FIFO named like a frame would block the reader of its bytes for ever.
    regular, other = [], []
    with os.scandir(video_dir) as entries:
        for entry in entries:
            (regular if entry.is_file() else other).append(entry.name)
    stems = [
        name[:FRAME_DIGITS]
        for name in regular
        if len(name) == FRAME_DIGITS + 4 and name.endswith(".jpg")
    ]
    numbers = [int(stem) for stem in stems if stem.isascii() and stem.isdigit()]
    frames = np.array(numbers, dtype=np.int32)
    frames.sort()
    frames = frames[frames >= 1]
    ignored = []
    if len(frames) < len(regular) + len(other):  # something else is there: name it
        names = {f"{frame:0{FRAME_DIGITS}d}.jpg" for frame in frames.tolist()}
        ignored = [n for n in regular + other if n not in names and not n.startswith(".")]
    return frames, ignored


# --- the unlabelled test set ---------------------------------------------------------------------


def read_test_list(path: str | Path) -> list[tuple[str, int]]:
    """``(video, line)`` per name of an ABAW test-set list: one video name a line, blank lines and
    surrounding spaces skipped. A name that is not a video name, a name listed twice or a list
    naming no video is a DataError naming the file (and line)."""
    path = Path(path)
    try:
        data = read_bytes(path, limit=MAX_TEST_LIST_BYTES, what="test list")
        text = data.decode("utf-8-sig")
    except OSError as error:
        raise DataError(path, f"cannot read the test list: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DataError(path, "the test list is not UTF-8 text") from None
    names: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if not is_video_name(name):
            raise DataError(
                path,
                f"{excerpt(name)} is not a video name (a folder name under {FRAMES_DIR}: "
                f"at most {MAX_VIDEO_NAME} characters of printable ASCII, no space, slash or "
                "dot)",
                number,
            )
        if name in names:
            raise DataError(
                path, f"video {name} is listed twice (first on line {names[name]})", number
            )
        names[name] = number
    if not names:
        raise DataError(path, "the test list names no video (expected one video name a line)")
    return list(names.items())


# Printable ASCII without space, slash, backslash or dot: a folder name under cropped_aligned that
# is also a valid shard key prefix (DALI splits at the first dot) and never leaves that folder.
_VIDEO_NAME = re.compile(r"(?:(?![/\\.])[!-~])+")


def is_video_name(name: str) -> bool:
    """Whether ``name`` can be a video: one path component of at most ``MAX_VIDEO_NAME``
    characters of printable ASCII without space, slash, backslash or dot (so
    ``<folder>/<name>.txt`` never leaves ``<folder>``, and its keys fit a tar header)."""
    return len(name) <= MAX_VIDEO_NAME and _VIDEO_NAME.fullmatch(name) is not None


def read_test_set(
    dirs: AnnotationDirs, lists: dict[str, str | Path]
) -> tuple[list[VideoLabels], dict[str, list[str]]]:
    """The videos that ABAW test-set lists name: split "test", every frame with an image, no label.

    ``lists`` maps a task to its list file (:func:`read_test_list`). A listed video without a
    frames folder or without any frame image, or with an annotation file for the task whose list
    names it (test leakage: labels for another task are allowed), is a DataError naming the list
    file and line. Returns the videos sorted by name (``frame_count`` 0: unknown) and each task's
    names, sorted.
    """
    return test_videos(dirs, {task: (Path(p), read_test_list(p)) for task, p in lists.items()})


def test_videos(
    dirs: AnnotationDirs, listed: dict[str, tuple[Path, list[tuple[str, int | None]]]]
) -> tuple[list[VideoLabels], dict[str, list[str]]]:
    """:func:`read_test_set` from names already read: ``{task: (where, [(video, line), ...])}``
    (``where`` and ``line`` name the source in errors; a line may be None)."""
    tasks = [t for t in TASKS if dirs.task_dir(t) is not None]
    annotated = _index_annotations(dirs, tasks) if tasks else {}
    first: dict[str, tuple[Path, int | None]] = {}  # video -> the first (list, line) naming it
    for task, (path, names) in listed.items():
        for name, line in names:
            files = annotated.get(name, ("", {}))[1]
            if task in files:
                raise DataError(
                    path,
                    f"video {name} is in the {task} test list but has {task} labels in "
                    f"{files[task]}: test leakage",
                    line,
                )
            if not (dirs.frames / name).is_dir():
                raise DataError(
                    path, f"unknown video {name}: no frames folder {dirs.frames / name}", line
                )
            first.setdefault(name, (path, line))
    videos = []
    for name in sorted(first):
        frames, ignored = _frames_of(dirs.frames / name)
        if not len(frames):
            path, line = first[name]
            raise DataError(
                path,
                f"video {name} has no frame image (a regular file named NNNNN.jpg) in "
                f"{dirs.frames / name}; {len(ignored)} other entries{_example(ignored)}",
                line,
            )
        videos.append(
            VideoLabels(
                name, "test", frames, **_ignored_columns(len(frames)), ignored_files=len(ignored)
            )
        )
    return videos, {task: sorted(n for n, _ in names) for task, (_, names) in listed.items()}


# --- parsing one annotation file ------------------------------------------------------------------


def _parse_annotation(path: Path, task: str) -> np.ndarray:
    """Labels of every line of a task file in the in-memory encoding; row i is frame i+1."""
    body = _read_body(path, task)
    values = _parse_numbers(path, body, LABEL_SIZE[task], integer=task != "va")
    return _CHECKS[task](path, body, values)


def _read_body(path: Path, task: str) -> list[bytes]:
    """The data lines of a file after its header was checked (CRLF, no final newline, trailing
    blank lines accepted)."""
    lines = _read_annotation(path).splitlines()  # on \n, \r\n and \r; no final newline needed
    expected = ",".join(HEADERS[task])
    header = lines[0].decode("utf-8-sig", errors="replace").strip() if lines else ""
    if [f.strip().lower() for f in header.split(",")] != [h.lower() for h in HEADERS[task]]:
        raise DataError(
            path, f"expected the {task} header {expected!r}, got {excerpt(header, QUOTE_LIMIT)}", 1
        )
    body = lines[1:]
    while body and not body[-1].strip():
        body.pop()
    if len(body) > MAX_FRAME_COUNT:  # frame numbers have 5 digits: no image could be frame 10^5
        raise DataError(
            path,
            f"{len(body):,} frame lines: frame numbers have {FRAME_DIGITS} digits, so a video "
            f"has at most {MAX_FRAME_COUNT:,} frames",
            MAX_FRAME_COUNT + 2,
        )
    # The EXPR header names 8 classes but each line holds one class index: widths come from tasks.
    width = LABEL_SIZE[task]
    fields = np.fromiter(map(bytes.count, body, repeat(b",")), dtype=np.int64, count=len(body)) + 1
    wrong = np.flatnonzero(fields != width)
    if wrong.size:
        i = int(wrong[0])
        what = "value" if width == 1 else "comma-separated values"
        raise DataError(path, f"expected {width} {what} ({_FIELDS[task]}), got {fields[i]}", i + 2)
    return body


def _read_annotation(path: Path) -> bytes:
    """An annotation file's bytes: a regular file (a FIFO would block pack for ever), bounded."""
    return read_bytes(path, limit=MAX_ANNOTATION_BYTES, what="annotation file")


def _parse_numbers(path: Path, body: list[bytes], width: int, integer: bool) -> np.ndarray:
    """Parse all lines at once into an n×width array; name the first bad field on failure."""
    joined = b",".join(body)
    blank = _find_blank_field(joined)
    if blank is not None:
        field, text = blank
        line, column = divmod(field, width)
        text = text.strip()
        message = f"{text!r} is not a number" if text else f"field {column + 1} is empty"
        raise DataError(path, f"{message}: expected a number", line + 2)
    values = None
    # Integers parse much faster than floats; "1.0" in an integer column still parses as float.
    for dtype in (np.int64, np.float64) if integer else (np.float64,):
        values = _fromstring(joined, dtype)
        if values is not None and values.size == len(body) * width:
            return values.reshape(len(body), width)
    for number, line in enumerate(body, start=2):
        for field in line.split(b","):
            parsed = _fromstring(field, np.float64)
            if parsed is None or parsed.size != 1:
                text = field.decode("utf-8", errors="replace").strip()
                raise DataError(path, f"{excerpt(text, QUOTE_LIMIT)} is not a number", number)
    raise DataError(path, "could not parse the values as numbers")  # unreachable in practice


# np.fromstring reads a field holding no digit as a number: "" or whitespace as 0 (as float -1.0),
# a lone sign as 0 (as integer). Such a field is one of these, between commas or the body's ends.
_BLANK_FIELD = re.compile(rb",([\s+-]*)(?=,|\Z)")
# A body that can hold one contains one of these (or ends with "," or a sign); well-formed files
# contain none, and a substring test costs a fraction of the parse, where the regex would not.
_BLANK_HINTS = (b",,", b"-,", b"+", b" ", b"\t", b"\v", b"\f")


def _find_blank_field(joined: bytes) -> tuple[int, str] | None:
    """(index, text) of the first field holding no digit in a comma-joined body, or None."""
    if not joined or not (
        joined.startswith(b",")
        or joined.endswith((b",", b"-"))
        or any(hint in joined for hint in _BLANK_HINTS)
    ):
        return None
    fields = b"," + joined  # one leading comma: every field, the first too, follows a comma
    match = _BLANK_FIELD.search(fields)
    if match is None:  # only spaces around numbers, say
        return None
    index = fields.count(b",", 0, match.start(1)) - 1
    return index, match.group(1).decode("ascii")


def _excerpt(text: str) -> str:
    """``text`` cut to :data:`QUOTE_LIMIT` characters, for a number shown unquoted in an error
    (``safe_files.excerpt`` quotes)."""
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


def _fromstring(data: bytes, dtype) -> np.ndarray | None:
    """``np.fromstring`` in text mode, None where it stops before the end (a non-number)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # older numpy only warns on unmatched data
        try:
            return np.fromstring(data, dtype=dtype, sep=",")
        except (ValueError, DeprecationWarning):
            return None


def _first_bad(
    path: Path, body: list[bytes], bad: np.ndarray, names: tuple[str, ...], expected: str
) -> None:
    """Raise a DataError naming the first bad (line, field), if any."""
    rows, cols = np.nonzero(bad)
    if rows.size:
        row, col = int(rows[0]), int(cols[0])
        text = body[row].split(b",")[col].decode("utf-8", errors="replace").strip()
        raise DataError(
            path, f"{names[col]} {_excerpt(text)} out of range: expected {expected}", row + 2
        )


def _check_va(path: Path, body: list[bytes], values: np.ndarray) -> np.ndarray:
    ignored = values == VA_IGNORE
    in_range = (values >= -1) & (values <= 1)  # NaN fails both comparisons
    _first_bad(
        path,
        body,
        ~(ignored | in_range),
        VA_NAMES,
        f"a value in [-1, 1] or {VA_IGNORE:g} to ignore",
    )
    va = values.astype(np.float32)
    va[ignored.any(axis=1)] = np.nan  # -5 in either value ignores the frame's VA
    return va


def _check_expr(path: Path, body: list[bytes], values: np.ndarray) -> np.ndarray:
    ok = np.isin(values, np.arange(EXPR_IGNORE, NUM_EXPR))
    _first_bad(
        path, body, ~ok, ("expression",), f"an integer 0..{NUM_EXPR - 1} or {EXPR_IGNORE} to ignore"
    )
    return values[:, 0].astype(np.int8)


def _check_au(path: Path, body: list[bytes], values: np.ndarray) -> np.ndarray:
    ok = np.isin(values, (0, 1, AU_IGNORE))
    _first_bad(path, body, ~ok, AU_NAMES, f"0 or 1, or {AU_IGNORE} to ignore")
    au = values.astype(np.int8)
    au[(au == AU_IGNORE).any(axis=1)] = AU_IGNORE  # a frame's AUs are ignored together
    return au


_FIELDS = {
    "va": ",".join(VA_NAMES),
    "expr": f"expression index 0..{NUM_EXPR - 1}",
    "au": ",".join(AU_NAMES),
}
_CHECKS = {"va": _check_va, "expr": _check_expr, "au": _check_au}
