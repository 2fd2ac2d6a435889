"""DDP in one place: read the torchrun environment once, return who this process is (STYLE.md §5).

Launched plainly (no ``WORLD_SIZE`` in the environment) everything is single-process and no process
group exists. Launched by ``torchrun`` it joins the group: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place: global rank, world size, its device, and whether it logs and saves."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_main: bool = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_rank() -> int:
    """This process's global rank as torchrun set it (0 when not launched by torchrun).

    For the few messages printed before the process group forms; after it, use ``DistInfo``.
    """
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank on its node as torchrun set it (0 when not launched by torchrun).

    For the work done once per node before the process group forms (staging the pack).
    """
    return int(os.environ.get("LOCAL_RANK", 0))


def cpu_budget() -> int:
    """How many CPUs this process may use: its affinity mask shared among its node's processes.

    The affinity mask is what the OS lets it run on (a scheduler's cpuset narrows it, unlike
    ``os.cpu_count()``); torchrun's LOCAL_WORLD_SIZE processes of a node share it evenly. At least 1.
    """
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def omp_num_threads() -> int | None:
    """OMP_NUM_THREADS where set (torchrun sets 1 for several processes a node unless given).

    torch takes its intra-op thread count from it when it loads; ``None`` when unset.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def setup_distributed(use_cuda: bool) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this rank's device.

    ``use_cuda``: train on the GPU with index LOCAL_RANK (NCCL) rather than the CPU (gloo).
    """
    rank = launched_rank()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(local_rank())
        device = torch.device("cuda", local_rank())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # Long timeout: rank 0 may spend minutes on a validation pass others wait for.
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
            device_id=device if use_cuda else None,
        )
    return DistInfo(rank, world_size, device, rank == 0)


def teardown_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` in rank order (a one-element list when not distributed)."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP broadcasts buffers at the start of each forward, but the last training forward then updates
    each rank's running stats from its own batch: without this, ranks would evaluate slightly
    different models and the gathered metrics would not match the saved checkpoint.
    """
    if info.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a Python float over ranks."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size
