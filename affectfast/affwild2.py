"""The Aff-Wild2 reader: find the annotation folders and frames, parse and join the three tasks.

(SKELETON: the data types below are the contract; the functions are being written.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class AnnotationDirs:
    """The challenge folders of a tree, one per task; None where the tree lacks that task."""

    frames: Path                      # the cropped_aligned folder: <frames>/<video>/<NNNNN>.jpg
    va: Path | None = None            # .../VA_Estimation_Challenge
    expr: Path | None = None          # .../EXPR_Recognition_Challenge or EXPR_Classification_Challenge
    au: Path | None = None            # .../AU_Detection_Challenge


@dataclass
class VideoLabels:
    """Every usable frame of one video (one subject), columnar so 2.8M frames stay small in memory.

    A frame is kept when its image exists and at least one task's label is valid.
    Arrays all have length N (number of kept frames), sorted by frame number.
    """

    name: str                 # e.g. "10-60-1280x720_right"; the folder under cropped_aligned
    split: str                # "train" or "val"
    frames: np.ndarray        # int32 N, 1-based frame numbers (image = <frames>/<name>/<NNNNN>.jpg)
    va: np.ndarray            # float32 N×2, NaN where VA is ignored or absent
    expr: np.ndarray          # int8 N, -1 where ignored or absent
    au: np.ndarray            # int8 N×12, a row of -1 where ignored or absent

    def __len__(self) -> int:
        return len(self.frames)
