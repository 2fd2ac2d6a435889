"""A doctor check's row: its three states, the GPU-only keys, and the reason a GPU check does not run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"
STATUSES = (PASSED, FAILED, NOT_RUN)
# Checks that need CUDA: on any other device they are "not run", and run_doctor enforces it.
GPU_ONLY = ("hw_decoder", "buffer_lifetime", "sync_profile", "pixel_parity", "ddp_gpus")


@dataclass
class Check:
    """One row of the report: its state, a one-line result, and what backs it."""

    key: str
    title: str
    status: str
    summary: str  # one line: the result, or (not run) the reason
    criterion: str = ""  # what "passed" means for this check
    details: dict = field(default_factory=dict)  # numbers (report.json)
    body: list[str] = field(default_factory=list)  # markdown lines (report.md)
    seconds: float = 0.0
    number: str = ""  # the numbering: "1", "2a", "2b", ...

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["body"]
        return d


def not_run(key: str, title: str, reason: str, criterion: str = "") -> Check:
    return Check(key, title, NOT_RUN, reason, criterion)


def no_cuda_reason(device: torch.device) -> str:
    """Why a GPU-only check does not run on ``device``."""
    if torch.cuda.is_available():
        return "--device cpu (this check needs the GPU)"
    return "no CUDA"
