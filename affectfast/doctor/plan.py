"""What doctor runs on (``DoctorConfig``) and how big each check runs there (``Plan``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from affectfast.constants import DEVICES
from affectfast.dist import cpu_budget

WORK = "work"
SMALL_SYNTH = (12, 40, 64)  # the torchrun check's pack: videos, frames, px (~330 train frames)


@dataclass(frozen=True)
class DoctorConfig:
    """What ``affectfast doctor`` runs on: shards (None: synthesize a small pack), device, length."""

    out: Path  # REPORT_DIR: report.md, report.json, the profiler trace, work/
    shards: Path | None = None  # a pack output folder; None: synthesize and pack into out/work
    device: str = "auto"  # auto: cuda when torch.cuda.is_available(), else cpu
    quick: bool = False  # fewer timed repeats, no torch.compile

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.shards is not None:
            object.__setattr__(self, "shards", Path(self.shards))
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")


@dataclass(frozen=True)
class Plan:
    """How big each check runs, chosen from the device and --quick (see :func:`make_plan`)."""

    device: torch.device
    image_size: int  # px of the throughput, buffer and parity checks
    batch_sizes: tuple[int, ...]  # of the throughput check
    threads: tuple[int, ...] = (2, 4, 8)  # DALI threads of the decode check (see sweep_threads)
    hw_loads: tuple[float, ...] = (0.0, 0.65, 1.0)  # hw_decoder_load of the decode check (GPU)
    decode_batch: int = 64
    decode_windows: int = 5  # timed windows of WINDOW batches, after 2 windows of warm-up
    # DALI threads of the buffer, parity and epochs checks; the throughput and sync checks (3, 4b)
    # build their runs as train does, with train's own thread count (train.loader_threads).
    loader_threads: int = 2
    steps: int = 10  # timed steps per repeat
    repeats: int = 3
    warmup: int = 3
    compile: bool = True
    epochs: int = 5
    small_batch: int = 64  # the buffer, parity and epochs checks
    synth: tuple[int, int, int] = SMALL_SYNTH  # the work pack (checks 2-6): videos, frames, px
    ddp_batch: int = 16
    ddp_image_size: int = 48

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def kind(self) -> str:
        return "dali-gpu" if self.cuda else "dali-cpu"


def sweep_threads(budget: int) -> tuple[int, ...]:
    """DALI thread counts the decode check times: powers of two from 2 below ``budget``, and
    ``budget`` itself (this process's CPUs: what ``train`` gives DALI on a GPU)."""
    counts = {budget}
    count = 2
    while count < budget:
        counts.add(count)
        count *= 2
    return tuple(sorted(counts))


def make_plan(device: torch.device, quick: bool) -> Plan:
    """Sizes that keep a GPU run within about 10 minutes and a CPU run within a few."""
    threads = sweep_threads(cpu_budget())
    if device.type == "cuda":
        return Plan(
            device,
            image_size=112,
            batch_sizes=(256, 512),
            threads=threads,
            decode_batch=256,
            loader_threads=4,
            steps=5 if quick else 10,
            repeats=3,
            compile=not quick,
            synth=(40, 300, 112),  # ~8k train frames: 15 batches of 512 per epoch
        )
    return Plan(
        device,
        image_size=48,
        batch_sizes=(32, 64),
        threads=threads,
        decode_batch=64,
        decode_windows=3 if quick else 5,
        steps=2 if quick else 5,
        repeats=2 if quick else 3,  # the median of 2 is their mean: --quick on 2 shared cores
        warmup=1 if quick else 2,
        compile=not quick,
        small_batch=32,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
