"""``affectfast doctor``: the acceptance run for a fresh node (docs/design.md §5), and its report.

What a 2-core development machine cannot prove, the product proves on the user's node: this package
runs the library's own checks there and writes ``REPORT_DIR/report.md`` and ``report.json``. Every
check ends in one of three states, and the report says which and why:

- ``passed``: it ran and met the criterion stated in its row (for a measurement: it completed);
- ``failed``: it ran and missed its criterion, or raised (the error is in the report);
- ``not run``: it could not run here, with the reason. A check that needs CUDA is "not run" on the
  CPU, never "passed".

The checks, one module per family (the ``gpu``-marked tests call the same functions):

1. ``environment`` (``environment.py``): GPUs, driver and CUDA versions, DALI and torch, bf16,
   usable CPUs, and whether the container exposes the driver's ``video`` capability (without it
   the hardware JPEG decoder is silently unavailable).
2. ``decode`` / ``hw_decoder`` (``decode.py``): decode-only images/s of the DALI pipeline over DALI
   threads, and on the GPU over ``hw_decoder_load``, with the best settings as an
   ``affectfast train`` line; NVML's NVJPG utilisation is the direct evidence that the hardware
   decoder works (not run on a MIG slice), a gain at load 1.0 over 0 only suggests it.
3. ``throughput`` / ``throughput_compiled`` (``throughput.py``): the loader alone, the model alone
   on batches held in memory, and training fed by the loader (loader overhead = memory / fed),
   with and without ``torch.compile``, with train's own thread counts.
4. ``buffer_lifetime`` / ``sync_profile`` (GPU, ``streams.py``): DALI never writes an output
   buffer torch still holds or has yet to read (float32 and the bfloat16 cast), and a training
   step never makes the host wait for the GPU (torch's sync debug mode; a profiler trace is saved).
5. ``pixel_parity`` (GPU, ``parity.py``): the same val frames from ``dali-gpu`` and ``dali-cpu``,
   frame by frame: decoders, a resize, a rotation.
6. ``epochs`` (``epochs.py``): time to the first batch, threads and memory after each of 5 epochs:
   growth is a leak.
7. ``ddp_gloo`` / ``ddp_gpus`` (``ddp.py``): torchrun with 2 processes (gloo on the CPU; NCCL with
   2 GPUs): equal batch counts, no hang at the epoch end, ``--resume``, and the val outputs both
   ranks gather equal to one process's.

``check.py`` holds a row's type and states, ``plan.py`` what doctor runs on and how big,
``run.py`` the run (each check guarded), ``report.py`` report.md, report.json, the summary
and the record that marks REPORT_DIR as doctor's.
Checks 2-5 read the shards given (without SHARDS: a pack doctor synthesizes into
``REPORT_DIR/work``); 6 and 7 run whole epochs, so they always read synthesized packs (small ones).
"""

from __future__ import annotations

from affectfast.doctor.check import (
    FAILED,
    GPU_ONLY,
    NOT_RUN,
    PASSED,
    STATUSES,
    Check,
    no_cuda_reason,
    not_run,
)
from affectfast.doctor.ddp import check_ddp
from affectfast.doctor.decode import check_decode, hardware_decoder_verdict
from affectfast.doctor.environment import check_environment, video_capability
from affectfast.doctor.epochs import check_epochs
from affectfast.doctor.parity import PARITY_MEAN_TOLERANCE, check_pixel_parity
from affectfast.doctor.plan import DoctorConfig, Plan, make_plan
from affectfast.doctor.report import format_summary, write_report
from affectfast.doctor.run import enforce_gpu_only, guarded, run_doctor
from affectfast.doctor.streams import check_buffer_lifetime, check_sync_profile
from affectfast.doctor.throughput import check_throughput

__all__ = [
    "Check",
    "DoctorConfig",
    "FAILED",
    "GPU_ONLY",
    "NOT_RUN",
    "PARITY_MEAN_TOLERANCE",
    "PASSED",
    "Plan",
    "STATUSES",
    "check_buffer_lifetime",
    "check_ddp",
    "check_decode",
    "check_environment",
    "check_epochs",
    "check_pixel_parity",
    "check_sync_profile",
    "check_throughput",
    "enforce_gpu_only",
    "format_summary",
    "guarded",
    "hardware_decoder_verdict",
    "make_plan",
    "no_cuda_reason",
    "not_run",
    "run_doctor",
    "video_capability",
    "write_report",
]
