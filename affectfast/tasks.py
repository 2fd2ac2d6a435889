"""The three Aff-Wild2 tasks: names, annotation headers, ignore markers and the shard label encoding.

This module is the single place that knows how a label looks in an annotation file, in memory and
inside a shard (docs/design.md §1 and §2). Everything else imports from here.

In memory a video's labels are columnar numpy arrays (see ``affwild2.VideoLabels``):
- ``va``: float32 N×2 (valence, arousal), NaN where the frame's VA label is ignored;
- ``expr``: int8 N, -1 where ignored;
- ``au``: int8 N×12, a row of -1 where ignored.
"""

from __future__ import annotations

import numpy as np

from affectfast.constants import SPLITS  # noqa: F401  (split names: a CLI choice list)

TASKS: tuple[str, ...] = ("va", "expr", "au")

VA_NAMES: tuple[str, ...] = ("valence", "arousal")
EXPR_NAMES: tuple[str, ...] = (
    "Neutral",
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
    "Other",
)
AU_NAMES: tuple[str, ...] = (
    "AU1",
    "AU2",
    "AU4",
    "AU6",
    "AU7",
    "AU10",
    "AU12",
    "AU15",
    "AU23",
    "AU24",
    "AU25",
    "AU26",
)
NUM_EXPR = len(EXPR_NAMES)
NUM_AU = len(AU_NAMES)

# The header line (line 1) of each task's annotation files.
HEADERS: dict[str, tuple[str, ...]] = {"va": VA_NAMES, "expr": EXPR_NAMES, "au": AU_NAMES}

# Challenge folder names per task; EXPR has two names across ABAW editions.
CHALLENGE_DIRS: dict[str, tuple[str, ...]] = {
    "va": ("VA_Estimation_Challenge",),
    "expr": ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"),
    "au": ("AU_Detection_Challenge",),
}
# Annotation set folder -> split name.
SPLIT_DIRS: dict[str, str] = {"Train_Set": "train", "Validation_Set": "val"}

# Ignore markers in annotation files.
VA_IGNORE = -5.0
EXPR_IGNORE = -1
AU_IGNORE = -1

# Shard component extension per task (docs/design.md §2). The image is always "jpg".
IMAGE_EXT = "jpg"
LABEL_EXT: dict[str, str] = {"va": "va", "expr": "expr", "au": "au"}
# Shape and dtype of each label component inside a shard (little-endian, no header).
LABEL_DTYPE: dict[str, np.dtype] = {
    "va": np.dtype("<f4"),
    "expr": np.dtype("u1"),
    "au": np.dtype("u1"),
}
LABEL_SIZE: dict[str, int] = {"va": 2, "expr": 1, "au": NUM_AU}


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, split at the first dot of its file name, as DALI and
    webdataset do: "vid/00001.jpg" -> ("vid/00001", "jpg"); no dot -> (name, "")."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def parse_tasks(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Turn "va,expr" (or a sequence) into a validated tuple in canonical order; raise ValueError."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [t for t in names if t]
    unknown = sorted(set(names) - set(TASKS))
    if unknown or not names:
        raise ValueError(f"tasks must be a non-empty subset of {','.join(TASKS)}; got {text!r}")
    return tuple(t for t in TASKS if t in names)


def encode_label(task: str, value) -> bytes:
    """Bytes of one label component as stored in a shard (``va`` 2×<f4, ``expr`` 1×u1, ``au`` 12×u1)."""
    array = np.asarray(value, dtype=LABEL_DTYPE[task]).reshape(LABEL_SIZE[task])
    return array.tobytes()


def decode_label(task: str, data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_label`; raises ValueError on a wrong length."""
    array = np.frombuffer(data, dtype=LABEL_DTYPE[task])
    if array.size != LABEL_SIZE[task]:
        raise ValueError(
            f"{task} component has {len(data)} bytes, expected "
            f"{LABEL_SIZE[task] * LABEL_DTYPE[task].itemsize}"
        )
    return array


def labels_in_range(task: str, values):
    """Per row of shard labels (numpy or torch: VA N×2, EXPR N or N×1, AU N×12), True where the
    label is one the format allows: VA finite in [-1, 1], EXPR 0..7, AU all 0 or 1.

    Operators only (NaN and inf fail ``abs(x) <= 1``), so the trainer runs it on the device that
    holds a batch, without a host sync.
    """
    if task == "va":
        return (abs(values) <= 1).all(axis=-1)
    if task == "expr":
        return (values >= 0) & (values < NUM_EXPR)
    return ((values == 0) | (values == 1)).all(axis=-1)


def valid_mask(task: str, labels: np.ndarray) -> np.ndarray:
    """Bool mask of frames whose ``task`` label is valid, for the in-memory arrays described above."""
    if task == "va":
        return ~np.isnan(labels).any(axis=-1)
    if task == "expr":
        return labels >= 0
    return (labels >= 0).all(axis=-1)
