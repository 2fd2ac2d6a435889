"""DDP in one place: read the torchrun environment once, return who this process is (STYLE.md §5).

Launched plainly (no ``WORLD_SIZE`` in the environment) everything is single-process and no process
group exists. Launched by ``torchrun`` it joins the group: NCCL on GPUs, gloo on the CPU.

What only the main rank can see or do (the run folder, which may sit on its node alone; the
gathered predictions) it decides alone and shares with :func:`main_decides`, so a refusal ends
every rank with the same one-line error instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from affectfast.errors import DataError
from affectfast.safe_files import excerpt

T = TypeVar("T")


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


def cuda_device_index(rank_on_node: int, visible: int, mask: str | None = None) -> int:
    """The CUDA device a process of local rank ``rank_on_node`` trains on, as an index among the
    ``visible`` devices it sees (``mask``: its CUDA_VISIBLE_DEVICES, for the message).

    Each process sees all of its node's GPUs (torchrun's usual launch): device ``rank_on_node``.
    Each sees exactly one (a scheduler binding one GPU per task through CUDA_VISIBLE_DEVICES, as
    Slurm's ``--gpus-per-task=1`` does): device 0, its own. Any other count, more than one yet too
    few for the local rank, is refused in one line rather than guessed: a guess could put two
    processes on one GPU.
    """
    if rank_on_node < visible:
        return rank_on_node
    if visible == 1:
        return 0
    shown = "unset" if mask is None else excerpt(mask, 60)
    raise DataError(
        f"LOCAL_RANK={rank_on_node}",
        f"this process sees {visible} CUDA devices (CUDA_VISIBLE_DEVICES {shown}), too few for "
        "its local rank: let every process see all of its node's GPUs, or exactly one",
    )


def setup_distributed(use_cuda: bool) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this rank's device.

    ``use_cuda``: train on a GPU (NCCL) rather than the CPU (gloo): the one :func:`cuda_device_index`
    picks for LOCAL_RANK among the devices this process sees.
    """
    rank = launched_rank()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        index = cuda_device_index(
            local_rank(), torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        torch.cuda.set_device(index)  # object collectives (NCCL) stage through the current device
        device = torch.device("cuda", index)
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


def gather_to_main(obj, info: DistInfo) -> list | None:
    """Every rank's ``obj`` in rank order on the main rank, None on the others (a one-element
    list when not distributed). The others send theirs and keep nothing."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def main_decides(decide: Callable[[], T], info: DistInfo) -> T:
    """``decide()`` run on the main rank alone, its outcome shared with every rank: its result, or
    the error it raised, raised on every rank (the same one line: a DataError or OSError as it
    was, anything else as a RuntimeError naming it). Every rank must call it at the same point."""
    if not info.distributed:
        return decide()
    outcome = None
    if info.is_main:
        try:
            outcome = (True, decide())
        except Exception as error:
            broadcast_object((False, _shareable(error)), info)
            raise  # the main rank keeps its own traceback
    ok, value = broadcast_object(outcome, info)
    if not ok:
        raise value
    return value


def _shareable(error: Exception) -> Exception:
    """``error`` as it can cross to the other ranks: DataError and OSError pickle whole."""
    if isinstance(error, (DataError, OSError)):
        return error
    return RuntimeError(f"rank 0 stopped: {type(error).__name__}: {str(error)[:300]}")


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
