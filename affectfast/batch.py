"""The Batch every loader yields, whatever its kind (docs/design.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One batch of frames.

    images: float N×3×H×W in channels_last memory format, normalized with ImageNet mean/std, in the
            dtype asked for (float32, float16 or bfloat16), on the device asked for.
    labels: per trained task: "va" float32 N×2, "expr" int64 N, "au" float32 N×12 (0/1).
            Where a label is invalid its value is arbitrary (0) and its mask is False.
    masks:  per trained task: bool N, True where that frame's label is valid.
    keys:   the sample keys "<video>/<NNNNN>" when asked for (evaluation, prediction), else None.
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    keys: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]
