"""``affectfast doctor``: the acceptance run for a fresh node (docs/design.md §5), and its report.

What a 2-core development machine cannot prove, the product proves on the user's node: this module
runs the library's own checks there and writes ``REPORT_DIR/report.md`` and ``report.json``. Every
check ends in one of three states, and the report says which and why:

- ``passed``: it ran and met the criterion stated in its row (for a measurement: it completed);
- ``failed``: it ran and missed its criterion, or raised (the error is in the report);
- ``not run``: it could not run here, with the reason. A check that needs CUDA is "not run" on the
  CPU, never "passed".

The checks (each a function below; the ``gpu``-marked tests call the same functions):

1. ``environment``: GPUs, driver and CUDA versions, DALI and torch, bf16, usable CPUs, and whether
   the container exposes the driver's ``video`` capability (without it the hardware JPEG decoder is
   silently unavailable).
2. ``decode`` / ``hw_decoder``: decode-only images/s of the DALI pipeline over DALI threads, and on
   the GPU over ``hw_decoder_load``; NVML's NVJPG utilisation is the direct evidence that the
   hardware decoder works, a gain at load 1.0 over 0 only suggests it.
3. ``throughput`` / ``throughput_compiled``: the loader alone, the model alone on batches held in
   memory, and training fed by the loader (loader overhead = memory / fed), with and without
   ``torch.compile``.
4. ``buffer_lifetime`` / ``sync_profile`` (GPU): DALI's output buffers stay valid while torch holds
   them, and how often a training step synchronizes (a torch.profiler trace is saved).
5. ``pixel_parity`` (GPU): the same val frames from ``dali-gpu`` and ``dali-cpu``.
6. ``epochs``: time to the first batch, threads and memory after each of 5 epochs: growth is a leak.
7. ``ddp_gloo`` / ``ddp_gpus``: torchrun with 2 processes (gloo on the CPU; NCCL with 2 GPUs): equal
   batch counts, no hang at the epoch end, ``--resume``, and metrics equal to a one-process evaluate.

Checks 2-5 read the shards given (without SHARDS: a pack doctor synthesizes into
``REPORT_DIR/work``); 6 and 7 run whole epochs, so they always read synthesized packs (small ones).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import torch

from affectfast.batch import Batch
from affectfast.config import AugmentSpec, EvalConfig, TrainConfig
from affectfast.console import say
from affectfast.constants import DEVICES
from affectfast.dist import DistInfo
from affectfast.errors import DataError
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"
STATUSES = (PASSED, FAILED, NOT_RUN)
# Checks that need CUDA: on any other device they are "not run", and run_doctor enforces it.
GPU_ONLY = ("hw_decoder", "buffer_lifetime", "sync_profile", "pixel_parity", "ddp_gpus")

# Criteria, stated once and printed in the report.
PARITY_MEAN_TOLERANCE = 0.02  # mean |gpu - cpu| in normalized units (1/255 of a level is ~0.017)
DDP_METRIC_TOLERANCE = {"cpu": 1e-5, "cuda": 5e-3}  # |DDP - one process| per metric (bf16 on GPU)
DEVICE_MEMORY_GROWTH_MIB = 64  # GPU memory in use (DALI's pools included) may settle by this much
RSS_GROWTH_MIB = 128  # process RSS may settle by this much (allocator arenas), epoch 2 -> last
DDP_TIMEOUT_S = 300  # one torchrun launch; longer counts as a hang
SLEEP_CYCLES = 50_000_000  # torch.cuda._sleep per batch in the buffer check: ~25-35 ms at 1.5-2 GHz
SYNC_EVENTS = (
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaStreamWaitEvent",
)
WINDOW = 4  # batches per timing window of the decode measurement
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
    threads: tuple[int, ...] = (2, 4, 8)  # DALI threads of the decode check
    hw_loads: tuple[float, ...] = (0.0, 0.65, 1.0)  # hw_decoder_load of the decode check (GPU)
    decode_batch: int = 64
    decode_windows: int = 5  # timed windows of WINDOW batches, after 2 windows of warm-up
    loader_threads: int = 2  # DALI threads of the throughput, epochs and parity checks
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


def make_plan(device: torch.device, quick: bool) -> Plan:
    """Sizes that keep a GPU run within about 10 minutes and a CPU run within a few."""
    if device.type == "cuda":
        return Plan(
            device,
            image_size=112,
            batch_sizes=(256, 512),
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
        decode_batch=64,
        decode_windows=3 if quick else 5,
        steps=2 if quick else 5,
        repeats=2 if quick else 3,  # the median of 2 is their mean: --quick on 2 shared cores
        warmup=1 if quick else 2,
        compile=not quick,
        small_batch=32,
    )


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


# --- 1. environment --------------------------------------------------------------------------------


class Nvml:
    """The few NVML calls doctor reads, through ctypes on the driver's libnvidia-ml.so.1 (the library
    pynvml wraps), so the evidence needs no extra package on the node."""

    SUCCESS = 0

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check("nvmlInit_v2")

    def _check(self, name: str, *args) -> None:
        code = getattr(self.lib, name)(*args)
        if code != self.SUCCESS:
            raise OSError(f"{name} returned NVML error {code}")

    def driver_version(self) -> str:
        text = ctypes.create_string_buffer(96)
        self._check("nvmlSystemGetDriverVersion", text, ctypes.c_uint(96))
        return text.value.decode()

    def cuda_driver_version(self) -> str:
        version = ctypes.c_int()
        self._check("nvmlSystemGetCudaDriverVersion_v2", ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"

    def handle(self, device: torch.device) -> ctypes.c_void_p:
        """NVML's handle of a CUDA device, found by UUID (NVML and CUDA may number GPUs apart)."""
        handle = ctypes.c_void_p()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        self._check("nvmlDeviceGetHandleByUUID", uuid.encode(), ctypes.byref(handle))
        return handle

    def utilization(self, handle, engine: str) -> int | None:
        """Percent busy of ``engine`` ("Jpg": NVJPG; "Decoder": NVDEC, the video decoder) over
        NVML's last sampling period; None where this driver or GPU does not report it."""
        function = getattr(self.lib, f"nvmlDeviceGet{engine}Utilization", None)
        if function is None:
            return None
        value, period = ctypes.c_uint(), ctypes.c_uint()
        code = function(handle, ctypes.byref(value), ctypes.byref(period))
        return value.value if code == self.SUCCESS else None

    def close(self) -> None:
        self.lib.nvmlShutdown()


def open_nvml() -> tuple[Nvml | None, str]:
    """(NVML, "") or (None, why not)."""
    try:
        return Nvml(), ""
    except (OSError, AttributeError) as error:
        return None, f"NVML unavailable ({error})"


def video_capability(value: str | None) -> bool | None:
    """Whether NVIDIA_DRIVER_CAPABILITIES grants ``video`` (None: unset, so unknown)."""
    if value is None:
        return None
    caps = {c.strip() for c in value.split(",")}
    return bool(caps & {"video", "all"})


def library_loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def dali_versions() -> dict:
    """DALI's version, the CUDA it was built for, and the CUDA libraries it finds (-1: not found)."""
    import nvidia.dali as dali
    from nvidia.dali import backend

    build = str(dali.__cuda_version__)
    return {
        "dali": dali.__version__,
        "dali_cuda_build": f"{build[:2]}.{build[2:3]}" if len(build) >= 3 else build,
        "dali_cuda_runtime": backend.GetCudaVersion(),
        "dali_npp": backend.GetNppVersion(),
        "dali_cufft": backend.GetCufftVersion(),
    }


def nvidia_smi(out: Path | None) -> tuple[str | None, str]:
    """(nvidia-smi's query line per GPU, or None; why not). Its full output goes to out/."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi not on the PATH"
    try:
        query = subprocess.run(
            [exe, "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out is not None:
            full = subprocess.run([exe], capture_output=True, text=True, timeout=30)
            (out / "nvidia-smi.txt").write_text(full.stdout + full.stderr)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"nvidia-smi failed: {error}"
    return query.stdout.strip() or query.stderr.strip(), ""


def check_environment(device: torch.device, out: Path | None = None) -> Check:
    """Record what the node is; warn where the GPU path will silently be slower than it should."""
    env: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "nvidia_driver_capabilities": os.environ.get("NVIDIA_DRIVER_CAPABILITIES"),
        "libnvcuvid_loads": library_loads("libnvcuvid.so.1"),
    }
    env.update(dali_versions())
    try:
        import pynvml

        env["pynvml"] = getattr(pynvml, "__version__", "importable")
    except ImportError:
        env["pynvml"] = None
    gpus = []
    for index in range(env["gpu_count"]):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    env["gpus"] = gpus
    env["bf16"] = (
        torch.cuda.is_bf16_supported(including_emulation=False)
        if torch.cuda.is_available()
        else None
    )
    nvml, why = open_nvml()
    if nvml is not None:
        env["driver"], env["driver_cuda"] = nvml.driver_version(), nvml.cuda_driver_version()
        nvml.close()
    else:
        env["driver"] = env["driver_cuda"] = None
        env["nvml"] = why
    env["nvidia_smi"], env["nvidia_smi_note"] = nvidia_smi(out)

    warnings = []
    video = video_capability(env["nvidia_driver_capabilities"])
    if device.type == "cuda" and video is not True:
        # A hint, not a verdict: some runtimes map the driver's libraries whatever the variable
        # says (an H200 node with compute,graphics,utility still ran NVJPG). Check 2b decides.
        said = (
            f"NVIDIA_DRIVER_CAPABILITIES={env['nvidia_driver_capabilities']} lacks `video`"
            if video is False
            else "NVIDIA_DRIVER_CAPABILITIES is unset (bare metal: fine; a container runtime's "
            "default compute,utility lacks `video`)"
        )
        loads = "loads" if env["libnvcuvid_loads"] else "does not load"
        warnings.append(
            f"{said}: under the NVIDIA container toolkit the hardware JPEG decoder is then "
            f"silently unavailable and DALI decodes with CUDA. The driver's video library "
            f"(libnvcuvid) {loads} here; the hardware decoder check (2b) says whether NVJPG "
            "works. To grant it: NVIDIA_DRIVER_CAPABILITIES=compute,utility,video (or all)."
        )
        if env["dali_cuda_runtime"] == -1:
            warnings.append("DALI finds no CUDA runtime: its GPU operators cannot run.")
    env["warnings"] = warnings

    if gpus:
        names = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus)
        gpu_text = f"{len(gpus)} GPU: {names}; driver {env['driver']} (CUDA {env['driver_cuda']})"
    else:
        gpu_text = "no GPU visible"
    summary = (
        f"{gpu_text}; torch {env['torch']} (CUDA {env['torch_cuda_build']}), DALI {env['dali']} "
        f"(CUDA {env['dali_cuda_build']}); {env['cpus_usable']} CPUs usable"
        + (f"; {len(warnings)} warning(s)" if warnings else "")
    )
    body = [f"- {k}: `{v}`" for k, v in env.items() if k not in ("gpus", "warnings")]
    body += [f"- GPU {g['index']}: {g}" for g in gpus]
    body += [
        "- DALI library versions: -1 means DALI did not find the library. NPP backs only DALI's "
        "remap and debayer operators and cuFFT its spectral ones, none of which affectfast's "
        "graph uses.",
        "- The hardware JPEG decoder (NVJPG, A100/H100 class GPUs): under the NVIDIA container "
        "toolkit it needs the driver's `video` capability (NVIDIA_DRIVER_CAPABILITIES contains "
        "video or all); without it DALI decodes with CUDA and says nothing. `libnvcuvid_loads` "
        "tells whether the driver's video library is mapped here; NVML's NVJPG utilisation "
        "(check 2b) is the proof either way.",
    ]
    body += [f"- **warning**: {w}" for w in warnings]
    return Check(
        "environment",
        "environment",
        PASSED,
        summary,
        "recorded (warnings do not fail it)",
        env,
        body,
    )


# --- 2. decode-only throughput, and the hardware decoder -------------------------------------------


class UtilSampler:
    """Polls NVML's NVJPG and NVDEC utilisation in a thread while a block runs; keeps the maxima."""

    def __init__(self, nvml: Nvml | None, handle, period_s: float = 0.05):
        self.nvml, self.handle, self.period_s = nvml, handle, period_s
        self.jpg: list[int] = []
        self.dec: list[int] = []
        self._stop = threading.Event()

    def __enter__(self):
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.nvml is not None:
            self._thread.join()

    def _poll(self):
        while not self._stop.wait(self.period_s):
            for engine, values in (("Jpg", self.jpg), ("Decoder", self.dec)):
                value = self.nvml.utilization(self.handle, engine)
                if value is not None:
                    values.append(value)

    def maxima(self) -> tuple[int | None, int | None]:
        return (max(self.jpg) if self.jpg else None, max(self.dec) if self.dec else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(
    shards: Path, plan: Plan, kind: str, threads: int, hw_load: float = 0.65
) -> tuple[float, int]:
    """(median images/s over timed windows, images timed) of the bare decode pipeline."""
    device = plan.device if kind == "dali-gpu" else torch.device("cpu")
    loader = build_loader(
        kind,
        shards,
        "train",
        TASKS,
        plan.decode_batch,
        image_size=plan.image_size,
        augment=None,
        device=device,
        num_threads=threads,
        hw_decoder_load=hw_load,
    )
    pipe = loader.pipeline(decode_only=True)
    try:
        for _ in range(2 * WINDOW):  # warm-up: buffers, thread pools, the decoder's allocations
            pipe.run()
        sync(device)  # the mixed decoder's work is asynchronous: time whole windows
        rates = []
        for _ in range(plan.decode_windows):
            start = time.perf_counter()
            for _ in range(WINDOW):
                pipe.run()
            sync(device)
            rates.append(WINDOW * plan.decode_batch / (time.perf_counter() - start))
    finally:
        del pipe
        gc.collect()
    return statistics.median(rates), WINDOW * plan.decode_batch * plan.decode_windows


def check_decode(shards: Path, plan: Plan) -> list[Check]:
    """Decode-only images/s over DALI threads (and hw_decoder_load on the GPU); the NVJPG verdict."""
    criterion = "every configuration decoded; images/s is the median of timed windows"
    hw_title = "hardware JPEG decoder (hw_decoder_load sweep)"
    hw_criterion = (
        "NVML reads NVJPG utilisation > 0 while hw_decoder_load=1.0 decodes (direct evidence); "
        "a throughput gain at 1.0 over 0 alone only suggests it"
    )
    nvml, why = open_nvml() if plan.cuda else (None, "")
    handle = nvml.handle(plan.device) if nvml is not None else None
    loads = plan.hw_loads if plan.cuda else (None,)
    rows = []
    try:
        for load in loads:
            for threads in plan.threads:
                with UtilSampler(nvml, handle) as sampler:
                    rate, images = decode_rate(
                        shards, plan, plan.kind, threads, 0.65 if load is None else load
                    )
                jpg, dec = sampler.maxima()
                rows.append(
                    {
                        "kind": plan.kind,
                        "hw_decoder_load": load,
                        "threads": threads,
                        "images_per_s": rate,
                        "images_timed": images,
                        "nvjpg_max_pct": jpg,
                        "nvdec_max_pct": dec,
                    }
                )
    finally:
        if nvml is not None:
            nvml.close()
    best = max(rows, key=lambda r: r["images_per_s"])
    body = [
        f"Decode only (reader + `fn.decoders.image`, no augmentation), {plan.kind}, batch "
        f"{plan.decode_batch}, train split; images/s = median of {plan.decode_windows} windows of "
        f"{WINDOW} batches after {2 * WINDOW} warm-up batches.",
        "",
        "| kind | hw_decoder_load | DALI threads | images/s | NVJPG max % | NVDEC max % |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = "-" if r["hw_decoder_load"] is None else f"{r['hw_decoder_load']:g}"
        body.append(
            f"| {r['kind']} | {load} | {r['threads']} | {r['images_per_s']:,.0f} | "
            f"{_pct(r['nvjpg_max_pct'])} | {_pct(r['nvdec_max_pct'])} |"
        )
    decode = Check(
        "decode",
        f"decode-only throughput ({plan.kind})",
        PASSED,
        f"best {best['images_per_s']:,.0f} images/s ({best['threads']} threads"
        + (f", hw_decoder_load {best['hw_decoder_load']:g})" if plan.cuda else ")"),
        criterion,
        {"rows": rows},
        body,
    )
    if not plan.cuda:
        return [decode, not_run("hw_decoder", hw_title, no_cuda_reason(plan.device), hw_criterion)]
    return [decode, hardware_decoder_verdict(rows, why, hw_title, hw_criterion)]


def _pct(value) -> str:
    return "-" if value is None else f"{value}"


def hardware_decoder_verdict(rows: list[dict], nvml_why: str, title: str, criterion: str) -> Check:
    """Judge the hardware decoder from the decode rows: NVJPG utilisation first, throughput second."""

    def at(load):
        return {r["threads"]: r for r in rows if r["hw_decoder_load"] == load}

    full, none = at(1.0), at(0.0)
    gains = {t: full[t]["images_per_s"] / none[t]["images_per_s"] for t in full if t in none}
    gain_text = ", ".join(f"{g:.2f}x at {t} threads" for t, g in sorted(gains.items()))
    jpg = [full[t]["nvjpg_max_pct"] for t in full if full[t]["nvjpg_max_pct"] is not None]
    details = {"gain_1_over_0": gains, "nvjpg_max_pct_at_1": max(jpg) if jpg else None}
    body = [
        f"- images/s at hw_decoder_load 1.0 over 0: {gain_text}. A large gain *suggests* the "
        "hardware decoder takes the images; it is not proof (CUDA decoding can also speed up).",
        "- NVML's NVJPG utilisation (nvmlDeviceGetJpgUtilization) is the direct evidence; NVDEC "
        "(nvmlDeviceGetDecoderUtilization, what pynvml's decoder utilisation reads) is the video "
        "decoder, not the JPEG one, and is shown for contrast only.",
    ]
    if not jpg:
        why = nvml_why or "this driver or GPU does not report NVJPG utilisation through NVML"
        return Check(
            "hw_decoder",
            title,
            NOT_RUN,
            f"no NVJPG reading ({why}); the throughput gain ({gain_text}) only suggests "
            "whether the hardware decoder is used",
            criterion,
            details,
            body,
        )
    if max(jpg) > 0:
        return Check(
            "hw_decoder",
            title,
            PASSED,
            f"in use: NVJPG up to {max(jpg)}% busy at hw_decoder_load 1.0; gain {gain_text}",
            criterion,
            details,
            body,
        )
    return Check(
        "hw_decoder",
        title,
        FAILED,
        f"not in use: NVJPG stayed at 0% with hw_decoder_load 1.0 (gain {gain_text}); does this "
        "GPU have NVJPG (A100/H100 class), and does the container grant `video` (environment)?",
        criterion,
        details,
        body,
    )


# --- 3. loader vs model throughput -----------------------------------------------------------------


def endless(loader) -> Iterator[Batch]:
    """Batches of epoch after epoch, for timings longer than an epoch."""
    epoch = loader.epoch
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def timed(run: Callable[[int], None], plan: Plan, batch_size: int) -> list[float]:
    """images/s of ``plan.repeats`` timed ``run(plan.steps)`` after one ``run(plan.warmup)``."""
    run(plan.warmup)
    rates = []
    for _ in range(plan.repeats):
        sync(plan.device)
        start = time.perf_counter()
        run(plan.steps)
        sync(plan.device)
        rates.append(plan.steps * batch_size / (time.perf_counter() - start))
    return rates


def run_config(shards: Path, plan: Plan, batch_size: int, out: Path, **changes) -> TrainConfig:
    """The training config the checks build runs from: the node's defaults, at this size."""
    from affectfast.train import resolve_device

    config = TrainConfig(
        shards=shards,
        out=out,
        loader=plan.kind,
        batch_size=batch_size,
        image_size=plan.image_size,
        amp="auto" if plan.cuda else "off",
        device=plan.device.type,
        num_threads=plan.loader_threads,
        **changes,
    )
    return resolve_device(config, cuda=plan.cuda)[0]


def build_checked_run(config: TrainConfig, plan: Plan):
    """train.build_run on this device, with the CUDA numerics `affectfast train` sets."""
    from affectfast.train import build_run, set_cuda_numerics

    if plan.cuda:
        set_cuda_numerics(config.deterministic)
    return build_run(config, DistInfo(device=plan.device))


def measure_training(shards: Path, plan: Plan, batch_size: int, torch_compile: bool, work: Path):
    """images/s of the loader alone, the step on batches in memory, and the step fed by the loader."""
    if torch_compile:
        torch._dynamo.reset()  # compile this run afresh, not as a recompilation of the last
        # The first steps compile forward and backward: keep them out of the timed runs.
        plan = dataclasses.replace(plan, warmup=max(plan.warmup, 3))
    config = run_config(shards, plan, batch_size, work / "run", torch_compile=torch_compile)
    run = build_checked_run(config, plan)
    run.ddp.train()
    stream = endless(run.train_loader)
    # The same batches, kept on the device (cloned: a loader may reuse its buffers).
    in_memory = [
        Batch(
            b.images.clone(),
            {t: v.clone() for t, v in b.labels.items()},
            {t: v.clone() for t, v in b.masks.items()},
        )
        for b in islice(stream, plan.steps)
    ]

    def loader_only(n):
        for batch in islice(stream, n):
            batch.images.sum()  # touch the pixels, so their copy and cast complete

    def fed(n):
        for batch in islice(stream, n):
            run.step(run.ddp, batch)

    def memory(n):
        for i in range(n):
            run.step(run.ddp, in_memory[i % len(in_memory)])

    row = {"batch_size": batch_size, "compile": torch_compile, "amp": config.amp}
    measurements = (("memory", memory), ("fed", fed))
    if not torch_compile:  # the loader is the same either way: time it once
        measurements = (("loader", loader_only),) + measurements
    for name, function in measurements:
        rates = timed(function, plan, batch_size)
        row[name] = statistics.median(rates)
        row[f"{name}_runs"] = rates
    row["overhead"] = row["memory"] / row["fed"]
    return row  # the run, its loader and the batches in memory go with this frame


def check_throughput(shards: Path, plan: Plan, work: Path, quick: bool) -> list[Check]:
    """The throughput rows, eager and compiled (compiled: skipped by --quick)."""
    criterion = (
        "measured (not judged): overhead = model-alone / loader-fed images/s; 1.0 means the loader "
        "costs training nothing, 2.0 that training waits on data half the time"
    )
    title = f"loader vs model throughput ({plan.kind}, {plan.image_size} px)"
    checks = []
    for compiled in (False, True):
        key = "throughput_compiled" if compiled else "throughput"
        name = f"{title}, torch.compile" if compiled else title
        if compiled and not plan.compile:
            checks.append(
                not_run(key, name, "--quick skips torch.compile", criterion),
            )
            continue
        rows = []
        for batch_size in plan.batch_sizes:
            rows.append(measure_training(shards, plan, batch_size, compiled, work))
            gc.collect()  # free one run's pipeline and device memory before the next is built
            if plan.cuda:
                torch.cuda.empty_cache()
        body = [
            f"{plan.kind}, amp {rows[0]['amp']}, {plan.image_size} px, {plan.loader_threads} DALI "
            f"threads; median of {plan.repeats} timed runs of {plan.steps} steps after "
            f"{plan.warmup} warm-up steps (device synchronized around each timed run).",
            "",
            "| batch | loader alone | model alone (in memory) | training fed by the loader | "
            "overhead (memory / fed) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            loader = f"{r['loader']:,.0f}" if "loader" in r else "(as above)"
            body.append(
                f"| {r['batch_size']} | {loader} | {r['memory']:,.0f} | {r['fed']:,.0f} | "
                f"{r['overhead']:.2f}x |"
            )
        summary = "; ".join(
            f"batch {r['batch_size']}: fed {r['fed']:,.0f} vs memory {r['memory']:,.0f} images/s, "
            f"overhead {r['overhead']:.2f}x"
            for r in rows
        )
        checks.append(Check(key, name, PASSED, summary, criterion, {"rows": rows}, body))
    return checks


# --- 4. buffer lifetime and synchronisation (GPU) --------------------------------------------------


def check_buffer_lifetime(shards: Path, plan: Plan, batches: int = 24, delay: int = 4) -> Check:
    """Does DALI (default executor) reuse an output buffer while torch still holds it?

    A reference pass records every val batch's checksum with the device synchronized after each.
    A second pass enqueues ``torch.cuda._sleep`` before consuming each batch (so DALI runs ahead),
    checksums it at once on the GPU, keeps it, and checksums it again ``delay`` batches later. Any
    difference means its memory changed under torch: a reused buffer, or a missing stream wait.
    """
    title = "DALI buffer lifetime (default executor, zero-copy outputs)"
    criterion = (
        "every held batch's checksum (float64 sum on the GPU) equals the reference pass, "
        f"immediately and {delay} batches later"
    )
    if not plan.cuda:
        return not_run("buffer_lifetime", title, no_cuda_reason(plan.device), criterion)
    # float32 out: finish_batch then neither copies nor casts, so torch holds DALI's own buffer.
    loader = build_loader(
        "dali-gpu",
        shards,
        "val",
        TASKS,
        plan.small_batch,
        image_size=plan.image_size,
        augment=None,
        device=plan.device,
        dtype=torch.float32,
        num_threads=plan.loader_threads,
    )
    reference = []
    for batch in islice(loader, batches):
        torch.cuda.synchronize(plan.device)
        reference.append(batch.images.sum(dtype=torch.float64).item())
    exec_dynamic = loader._batches._pipes[0].exec_dynamic  # the iterator of that pass
    held, immediate, late = [], [], []
    for i, batch in enumerate(islice(loader, batches)):  # abandoned epoch: a rebuilt pipeline
        torch.cuda._sleep(SLEEP_CYCLES)
        immediate.append(batch.images.sum(dtype=torch.float64))
        held.append(batch.images)
        if i >= delay:
            late.append(held[i - delay].sum(dtype=torch.float64))
            held[i - delay] = None
    torch.cuda.synchronize(plan.device)
    immediate = [s.item() for s in immediate]
    late = [s.item() for s in late]
    n = min(len(reference), len(immediate))
    # Against the reference, allow decoder jitter (1e-6 per value; another batch's pixels, even one
    # frame of them, move the sum by far more); the same memory summed twice must match exactly.
    slack = 1e-6 * plan.small_batch * 3 * plan.image_size**2
    bad_now = [i for i in range(n) if abs(immediate[i] - reference[i]) > slack]
    bad_late = [i for i in range(len(late)) if late[i] != immediate[i]]
    details = {
        "batches": n,
        "delay": delay,
        "sleep_cycles": SLEEP_CYCLES,
        "exec_dynamic": exec_dynamic,
        "mismatch_immediate": bad_now,
        "mismatch_late": bad_late,
    }
    body = [
        f"- val split, batch {plan.small_batch}, float32 (no cast: torch holds DALI's buffers), "
        f"executor exec_dynamic={exec_dynamic}; {n} batches, torch.cuda._sleep({SLEEP_CYCLES}) "
        f"before each, held for {delay} batches.",
        f"- checksums differing from the reference at once: {len(bad_now)}; "
        f"{delay} batches later: {len(bad_late)}.",
    ]
    ok = not bad_now and not bad_late and n > delay
    summary = (
        f"{n} batches held {delay} batches each: checksums unchanged"
        if ok
        else f"{len(bad_now)} batches differ at once, {len(bad_late)} later (of {n})"
        + ("" if n > delay else f": too few val batches ({n}) for the test")
    )
    return Check(
        "buffer_lifetime", title, PASSED if ok else FAILED, summary, criterion, details, body
    )


def check_sync_profile(shards: Path, plan: Plan, out: Path, steps: int = 5) -> Check:
    """torch.profiler over a few steady-state training steps: synchronisations per step."""
    title = "synchronisation per training step (torch.profiler)"
    criterion = "no cudaDeviceSynchronize in a steady-state step (stream and event waits reported)"
    if not plan.cuda:
        return not_run("sync_profile", title, no_cuda_reason(plan.device), criterion)
    from torch.profiler import ProfilerActivity, profile

    config = run_config(shards, plan, plan.batch_sizes[0], out / WORK / "run")
    run = build_checked_run(config, plan)
    stream = endless(run.train_loader)
    for batch in islice(stream, plan.warmup + 2):
        run.step(run.ddp, batch)
    torch.cuda.synchronize(plan.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in islice(stream, steps):
            run.step(run.ddp, batch)
    trace = out / "trace_train_steps.json"
    prof.export_chrome_trace(str(trace))
    counts = {name: 0 for name in SYNC_EVENTS}
    for event in prof.key_averages():
        if event.key in counts:
            counts[event.key] += event.count
    per_step = {name: count / steps for name, count in counts.items()}
    del run, stream, prof
    gc.collect()
    body = [
        f"- {steps} steps of training fed by {plan.kind} (batch {plan.batch_sizes[0]}, amp "
        f"{config.amp}) after {plan.warmup + 2} warm-up steps; trace: `{trace.name}` (open in "
        "chrome://tracing or Perfetto). Counts are CUPTI's CUDA runtime records for the whole "
        "process; calls DALI makes through the driver API directly are not among them.",
        "",
        "| CUDA runtime call | per step |",
        "|---|---|",
        *(f"| {name} | {value:.1f} |" for name, value in per_step.items()),
    ]
    ok = per_step["cudaDeviceSynchronize"] == 0
    summary = ", ".join(f"{n.removeprefix('cuda')} {v:.1f}" for n, v in per_step.items())
    return Check(
        "sync_profile",
        title,
        PASSED if ok else FAILED,
        f"per step: {summary}",
        criterion,
        {"per_step": per_step, "steps": steps, "trace": trace.name},
        body,
    )


# --- 5. pixel parity -------------------------------------------------------------------------------


def first_batches(
    shards: Path, kind: str, device: torch.device, plan: Plan, batches: int
) -> tuple[list[str], torch.Tensor]:
    """Keys and float32 CPU images of the first ``batches`` val batches of one loader kind."""
    loader = build_loader(
        kind,
        shards,
        "val",
        TASKS,
        plan.small_batch,
        image_size=plan.image_size,
        augment=None,
        shuffle=False,
        device=device,
        dtype=torch.float32,
        with_keys=True,
        num_threads=1 if kind == "wds" else plan.loader_threads,  # one worker: the val order
    )
    keys, images = [], []
    for batch in islice(loader, batches):
        keys += batch.keys
        images.append(batch.images.float().cpu())
    return keys, torch.cat(images)


def check_pixel_parity(
    shards: Path,
    plan: Plan,
    kinds: tuple[str, str] = ("dali-gpu", "dali-cpu"),
    batches: int = 4,
    tolerance: float = PARITY_MEAN_TOLERANCE,
) -> Check:
    """The same val frames (no augmentation, same order) from two loader kinds: mean/max |diff|."""
    title = f"pixel parity {kinds[0]} vs {kinds[1]}"
    criterion = (
        f"same keys in the same order, and mean |diff| < {tolerance} in normalized units "
        "(JPEG decoders round differently; one 8-bit level is about 0.017)"
    )
    if "dali-gpu" in kinds and not plan.cuda:
        return not_run("pixel_parity", title, no_cuda_reason(plan.device), criterion)
    (keys_a, a), (keys_b, b) = (
        first_batches(
            shards, k, plan.device if k == "dali-gpu" else torch.device("cpu"), plan, batches
        )
        for k in kinds
    )
    if keys_a != keys_b:
        return Check(
            "pixel_parity",
            title,
            FAILED,
            f"the two loaders gave different frames or orders ({len(keys_a)} vs {len(keys_b)} "
            "keys)",
            criterion,
            {"keys_a": keys_a[:8], "keys_b": keys_b[:8]},
        )
    diff = (a - b).abs()
    mean, worst = float(diff.mean()), float(diff.max())
    per_frame = diff.flatten(1).mean(1)
    details = {
        "frames": len(keys_a),
        "mean_abs_diff": mean,
        "max_abs_diff": worst,
        "worst_frame": keys_a[int(per_frame.argmax())],
        "worst_frame_mean": float(per_frame.max()),
        "tolerance": tolerance,
    }
    ok = mean < tolerance
    body = [
        f"- {len(keys_a)} val frames, {plan.image_size} px, keys identical and in the same order.",
        f"- mean |diff| {mean:.4f}, max |diff| {worst:.4f} (normalized units); the frame that "
        f"differs most is `{details['worst_frame']}` (mean {details['worst_frame_mean']:.4f}).",
    ]
    return Check(
        "pixel_parity",
        title,
        PASSED if ok else FAILED,
        f"{len(keys_a)} frames: mean |diff| {mean:.4f} (< {tolerance}: "
        f"{'yes' if ok else 'no'}), max {worst:.4f}",
        criterion,
        details,
        body,
    )


# --- 6. epochs: first batch, threads, memory ------------------------------------------------------


def thread_count() -> int:
    """Threads of this process."""
    return len(os.listdir("/proc/self/task"))


def rss_mib() -> float:
    """Resident set size of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def check_epochs(shards: Path, plan: Plan) -> Check:
    """``plan.epochs`` epochs of the train loader: time to the first batch, threads and memory after
    each; growth from the second epoch to the last is a leak."""
    title = f"{plan.epochs} epochs of the train loader ({plan.kind})"
    criterion = (
        "from epoch 2 to the last: threads do not grow, torch's allocated CUDA memory does not "
        f"grow, GPU memory in use grows < {DEVICE_MEMORY_GROWTH_MIB} MiB, RSS grows < "
        f"{RSS_GROWTH_MIB} MiB"
    )
    loader = build_loader(
        plan.kind,
        shards,
        "train",
        TASKS,
        plan.small_batch,
        image_size=plan.image_size,
        augment=AugmentSpec(),
        device=plan.device,
        dtype=torch.bfloat16 if plan.cuda else torch.float32,
        num_threads=plan.loader_threads,
    )
    rows = []
    for epoch in range(plan.epochs):
        loader.set_epoch(epoch)
        if plan.cuda:
            torch.cuda.reset_peak_memory_stats(plan.device)
        start = time.perf_counter()
        batches = iter(loader)
        batch = next(batches)
        sync(plan.device)
        first = time.perf_counter() - start
        count = 1 + sum(1 for _ in batches)
        del batch, batches
        sync(plan.device)
        gc.collect()
        row = {
            "epoch": epoch + 1,
            "batches": count,
            "first_batch_s": first,
            "epoch_s": time.perf_counter() - start,
            "threads": thread_count(),
            "rss_mib": rss_mib(),
        }
        if plan.cuda:
            free, total = torch.cuda.mem_get_info(plan.device)
            row.update(
                cuda_allocated_mib=torch.cuda.memory_allocated(plan.device) / 2**20,
                cuda_peak_mib=torch.cuda.max_memory_allocated(plan.device) / 2**20,
                device_used_mib=(total - free) / 2**20,
            )
        rows.append(row)
    base, last = rows[min(1, len(rows) - 1)], rows[-1]
    problems = []
    if last["threads"] > base["threads"]:
        problems.append(f"threads {base['threads']} -> {last['threads']}")
    if last["rss_mib"] - base["rss_mib"] >= RSS_GROWTH_MIB:
        problems.append(f"RSS {base['rss_mib']:.0f} -> {last['rss_mib']:.0f} MiB")
    if plan.cuda:
        if last["cuda_allocated_mib"] > base["cuda_allocated_mib"]:
            problems.append(
                f"torch CUDA allocated {base['cuda_allocated_mib']:.1f} -> "
                f"{last['cuda_allocated_mib']:.1f} MiB"
            )
        if last["device_used_mib"] - base["device_used_mib"] >= DEVICE_MEMORY_GROWTH_MIB:
            problems.append(
                f"GPU memory in use {base['device_used_mib']:.0f} -> "
                f"{last['device_used_mib']:.0f} MiB"
            )
    columns = ["epoch", "batches", "first_batch_s", "epoch_s", "threads", "rss_mib"]
    if plan.cuda:
        columns += ["cuda_allocated_mib", "cuda_peak_mib", "device_used_mib"]
    body = [
        f"batch {plan.small_batch}, {plan.image_size} px, augmentation on; first_batch_s is the "
        "time from iter() to the first batch (epoch 1 builds the pipeline)."
        + ("" if plan.cuda else " GPU memory: not measured (no CUDA)."),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *(
            "| " + " | ".join(_cell(r[c]) for c in columns) + " |"
            for r in rows  # one line per epoch
        ),
    ]
    summary = (
        f"first batch {rows[0]['first_batch_s']:.2f} s (epoch 1), "
        f"{statistics.median(r['first_batch_s'] for r in rows[1:] or rows):.2f} s after; "
        f"threads {base['threads']} -> {last['threads']}, RSS {base['rss_mib']:.0f} -> "
        f"{last['rss_mib']:.0f} MiB"
        + (
            f", GPU in use {base['device_used_mib']:.0f} -> {last['device_used_mib']:.0f} MiB"
            if plan.cuda
            else ""
        )
        + (f"; growth: {'; '.join(problems)}" if problems else "")
    )
    return Check(
        "epochs",
        title,
        FAILED if problems else PASSED,
        summary,
        criterion,
        {"rows": rows, "problems": problems},
        body,
    )


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# --- 7. DDP under torchrun -------------------------------------------------------------------------


def ddp_train_config(
    shards: Path, out: Path, batch_size: int, image_size: int, cuda: bool
) -> TrainConfig:
    """The 2-epoch run both torchrun launches share (the second resumes the first)."""
    return TrainConfig(
        shards=shards,
        out=out,
        loader="dali-gpu" if cuda else "dali-cpu",
        epochs=2,
        batch_size=batch_size,
        image_size=image_size,
        amp="bf16" if cuda else "off",
        device="cuda" if cuda else "cpu",
        num_threads=1,
    )


def ddp_worker(shards: Path, out: Path, cuda: bool, batch_size: int, image_size: int) -> None:
    """One torchrun process: count train batches per epoch with a collective after each (as DDP's
    backward has), write every rank's counts, then train the first of two epochs."""
    import torch.distributed as dist

    from affectfast.dist import gather_objects, setup_distributed
    from affectfast.train import train

    info = setup_distributed(cuda)
    loader = build_loader(
        "dali-gpu" if cuda else "dali-cpu",
        shards,
        "train",
        TASKS,
        batch_size,
        image_size=image_size,
        augment=AugmentSpec(),
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        num_threads=1,
    )
    counts = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        count = 0
        for _ in loader:
            count += 1
            dist.all_reduce(torch.ones(1, device=info.device))  # a rank short of batches hangs
        counts.append(count)
    rows = gather_objects({"rank": info.rank, "batches": counts, "expected": len(loader)}, info)
    if info.is_main:
        (out / "batch_counts.json").write_text(json.dumps(rows))
    del loader
    # train() joins the group already formed (setup_distributed sees it) and leaves it at the end.
    train(ddp_train_config(shards, out / "run", batch_size, image_size, cuda), stop_after=1)


def torchrun(args: list[str], nproc: int, log: Path) -> tuple[int | None, float]:
    """Run ``python -m torch.distributed.run`` with ``nproc`` processes; (exit code or None on a
    timeout, seconds). Its output goes to ``log``; a hung launch is killed with its process group."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=DDP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: our group only
            process.wait()
            code = None
    return code, time.perf_counter() - start


def check_ddp(shards: Path, plan: Plan, out: Path, cuda: bool = False) -> Check:
    """Two processes under torchrun (gloo on the CPU, or NCCL on two GPUs): see the module docstring."""
    from affectfast.predict import evaluate
    from affectfast.rundir import read_metrics

    key, title = (
        ("ddp_gpus", "torchrun, 2 GPUs (NCCL)")
        if cuda
        else ("ddp_gloo", "torchrun, 2 CPU processes (gloo)")
    )
    tolerance = DDP_METRIC_TOLERANCE["cuda" if cuda else "cpu"]
    criterion = (
        f"equal train batches on both ranks in 2 epochs; each launch ends within {DDP_TIMEOUT_S} s "
        "(else: a hang); --resume continues from epoch 1 to 2; metrics equal a one-process "
        f"evaluate of last.pt within {tolerance:g} (frame counts exactly)"
    )
    if cuda and not plan.cuda:
        return not_run(key, title, no_cuda_reason(plan.device), criterion)
    if cuda and torch.cuda.device_count() < 2:
        return not_run(key, title, "one GPU", criterion)
    folder = out / WORK / key
    if folder.exists():
        shutil.rmtree(folder)  # doctor's own folder from an earlier report: start the run afresh
    folder.mkdir(parents=True)
    config = ddp_train_config(shards, folder / "run", plan.ddp_batch, plan.ddp_image_size, cuda)
    first = [
        "-m",
        "affectfast.doctor",
        "ddp-worker",
        str(shards),
        str(folder),
        "cuda" if cuda else "cpu",
        str(plan.ddp_batch),
        str(plan.ddp_image_size),
    ]
    resume = [
        "-m",
        "affectfast",
        "train",
        str(shards),
        "--out",
        str(config.out),
        "--resume",
        *("--epochs", "2", "--batch-size", str(config.batch_size)),
        *("--image-size", str(config.image_size), "--amp", config.amp),
        *("--loader", config.loader, "--device", config.device, "--num-threads", "1"),
    ]
    details: dict = {"tolerance": tolerance, "folder": str(folder)}
    problems = []
    for name, args in (("first", first), ("resume", resume)):
        code, seconds = torchrun(args, 2, folder / f"{name}.log")
        details[f"{name}_seconds"] = seconds
        if code != 0:
            log_tail = (folder / f"{name}.log").read_text()[-1500:]
            what = (
                f"timed out after {DDP_TIMEOUT_S} s (a hang?)" if code is None else f"exit {code}"
            )
            return Check(
                key,
                title,
                FAILED,
                f"the {name} torchrun launch {what}; log: {folder / (name + '.log')}",
                criterion,
                {**details, "log_tail": log_tail},
                ["```", log_tail, "```"],
            )
    counts = json.loads((folder / "batch_counts.json").read_text())
    details["batch_counts"] = counts
    if len({tuple(r["batches"]) for r in counts}) != 1 or any(
        b != r["expected"] for r in counts for b in r["batches"]
    ):
        problems.append(f"batch counts differ: {counts}")
    records = read_metrics(config.out / "metrics.jsonl")
    details["epochs"] = [r["epoch"] for r in records]
    if details["epochs"] != [1, 2]:
        problems.append(f"metrics.jsonl holds epochs {details['epochs']}, not [1, 2]")
    single = evaluate(
        EvalConfig(config.out / "last.pt", shards, loader=config.loader, batch_size=64)
    )
    names = [k for k in ("ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "p_mtl") if k in single]
    gaps = {k: abs(records[-1][k] - single[k]) for k in names}
    details["metric_gaps"] = gaps
    if any(g > tolerance for g in gaps.values()):
        problems.append(f"metrics differ from one process by more than {tolerance:g}: {gaps}")
    frames = {t: (records[-1].get(f"frames_{t}"), single.get(f"frames_{t}")) for t in TASKS}
    if any(a != b for a, b in frames.values()):
        problems.append(f"val frames counted differ (DDP, one process): {frames}")
    body = [
        f"- launches: first (count + epoch 1) {details['first_seconds']:.0f} s, resume "
        f"(epoch 2) {details['resume_seconds']:.0f} s; batch {config.batch_size}, "
        f"{config.image_size} px, {config.loader}; logs in `{folder}`.",
        "- train batches per rank and epoch: "
        + ", ".join(f"rank {r['rank']}: {r['batches']} (expected {r['expected']})" for r in counts),
        f"- largest metric gap to one process: {max(gaps.values()):.2g}" if gaps else "",
    ]
    summary = (
        f"equal batches {counts[0]['batches']} on both ranks, no hang, resumed to epoch 2, "
        f"metrics match one process (max gap {max(gaps.values()):.1g})"
        if not problems
        else "; ".join(problems)
    )
    return Check(key, title, FAILED if problems else PASSED, summary, criterion, details, body)


# --- the run and the report ------------------------------------------------------------------------


def resolve_doctor_device(device: str, out: Path) -> torch.device:
    """auto: cuda when torch.cuda.is_available(), else cpu; cuda without CUDA is an error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError(out, "--device cuda, but no CUDA device is visible here")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def work_pack(out: Path, synth: tuple[int, int, int]) -> Path:
    """A synthetic pack of (videos, frames, px) in ``out/work`` (reused when doctor made it before)."""
    from affectfast.pack import PackConfig, pack
    from affectfast.synth import SynthConfig, synthesize

    videos, frames, size = synth
    folder = out / WORK / f"synth-v{videos}-f{frames}-s{size}"
    shards = folder / "shards"
    if not (shards / "manifest.json").exists():
        workers = len(os.sched_getaffinity(0))
        say(f"doctor: synthesizing {videos} videos x {frames} frames at {size} px into {folder}")
        synthesize(
            SynthConfig(
                out=folder / "tree",
                videos=videos,
                frames=frames,
                seed=0,
                image_size=size,
                workers=workers,
                overwrite=True,  # doctor's own folder; the tree is the same bytes for the seed
            )
        )
        pack(
            PackConfig(root=folder / "tree", out=shards, workers=workers, shard_size=1000, seed=0),
            progress=False,
        )
    return shards


def guarded(number: str, title: str, function: Callable, *args, **kwargs) -> list[Check]:
    """Run one check function; an exception becomes a failed check naming it, never a crash.

    A function returning several rows numbers them ``number`` + a, b, ...
    """
    start = time.perf_counter()
    say(f"doctor: {number}. {title} ...")
    try:
        result = function(*args, **kwargs)
        checks = result if isinstance(result, list) else [result]
    except Exception as error:  # noqa: BLE001 - the report must say what broke and go on
        checks = [
            Check(
                function.__name__.removeprefix("check_"),
                title,
                FAILED,
                f"error: {type(error).__name__}: {error}".splitlines()[0][:300],
                details={"traceback": traceback.format_exc()},
                body=["```", traceback.format_exc()[-3000:], "```"],
            )
        ]
    ran = [c for c in checks if c.status != NOT_RUN] or checks
    for letter, check in zip("abcdefgh", checks):
        check.number = f"{number}{letter}" if len(checks) > 1 else number
        ran_it = any(check is r for r in ran)
        check.seconds = (time.perf_counter() - start) / len(ran) if ran_it else 0.0
        say(f"doctor: {check.number}. {check.title}: {check.status}: {check.summary}")
    return checks


def enforce_gpu_only(checks: list[Check], device: torch.device) -> None:
    """Without CUDA a GPU-only check can only be "not run": anything else is doctor's own bug,
    reported as a failure rather than a pass."""
    if device.type == "cuda":
        return
    for check in checks:
        if check.key in GPU_ONLY and check.status != NOT_RUN:
            check.status = FAILED
            check.summary = f"doctor bug: a GPU-only check reported {check.summary!r} on {device}"


def run_doctor(config: DoctorConfig) -> list[Check]:
    """Run every check, write report.md and report.json into ``config.out``; return the checks."""
    started = datetime.now(UTC)
    clock = time.perf_counter()
    out = config.out
    device = resolve_doctor_device(config.device, out)
    plan = make_plan(device, config.quick)
    out.mkdir(parents=True, exist_ok=True)
    synthesized = work_pack(out, plan.synth)  # checks 2-5 without SHARDS; always check 6
    small = work_pack(out, SMALL_SYNTH)  # check 7 (the same pack on the CPU)
    shards = config.shards or synthesized
    work = out / WORK
    checks = guarded("1", "environment", check_environment, device, out)
    checks += guarded("2", "decode-only throughput", check_decode, shards, plan)
    checks += guarded("3", "throughput", check_throughput, shards, plan, work, config.quick)
    checks += guarded("4a", "DALI buffer lifetime", check_buffer_lifetime, shards, plan)
    checks += guarded("4b", "synchronisation profile", check_sync_profile, shards, plan, out)
    checks += guarded("5", "pixel parity", check_pixel_parity, shards, plan)
    checks += guarded("6", "epochs of the train loader", check_epochs, synthesized, plan)
    checks += guarded("7a", "torchrun, gloo", check_ddp, small, plan, out, cuda=False)
    checks += guarded("7b", "torchrun, GPUs", check_ddp, small, plan, out, cuda=True)
    enforce_gpu_only(checks, device)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - clock,
        "device": str(device),
        "quick": config.quick,
        "shards": str(shards),
        "shards_given": config.shards is not None,
        "epochs_pack": str(synthesized),
        "ddp_pack": str(small),
    }
    write_report(checks, meta, out)
    return checks


def write_report(checks: list[Check], meta: dict, out: Path) -> None:
    """``out/report.json`` (everything) and ``out/report.md`` (the table, then each check)."""
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    report = {**meta, "counts": counts, "checks": [c.to_dict() for c in checks]}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    source = (
        f"`{meta['shards']}` (given)"
        if meta["shards_given"]
        else f"`{meta['shards']}` (synthesized by doctor)"
    )
    lines = [
        "# affectfast doctor report",
        "",
        f"- started {meta['started']}, took {meta['seconds']:.0f} s; device `{meta['device']}`"
        + (" (--quick)" if meta["quick"] else ""),
        f"- shards: {source}; whole epochs run on synthesized packs: the epochs check on "
        f"`{meta['epochs_pack']}`, the torchrun checks on `{meta['ddp_pack']}`",
        f"- {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[NOT_RUN]} not run",
        "",
        "passed: ran and met its criterion (a measurement: it completed); failed: ran and missed "
        "it, or raised; not run: could not run here (the reason is given). A check that needs "
        "CUDA is never reported as passed without it.",
        "",
        "| # | check | status | result |",
        "|---|---|---|---|",
    ]
    for check in checks:
        status = f"**{check.status}**" if check.status == FAILED else check.status
        lines.append(f"| {check.number} | {check.title} | {status} | {_md(check.summary)} |")
    for check in checks:
        lines += ["", f"## {check.number}. {check.title}: {check.status}", ""]
        if check.criterion:
            lines.append(f"Criterion: {check.criterion}.")
            lines.append("")
        lines.append(_md(check.summary))
        if check.body:
            lines += ["", *check.body]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def format_summary(checks: list[Check], out: Path) -> str:
    """What the CLI prints: one line per check, then where the report is."""
    width = max(len(c.title) for c in checks)
    lines = [f"{c.number:<3} {c.status:<8} {c.title:<{width}}  {c.summary}" for c in checks]
    return "\n".join([*lines, f"report: {out / 'report.md'} and {out / 'report.json'}"])


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _main(argv: list[str]) -> None:
    """``python -m affectfast.doctor ddp-worker SHARDS FOLDER DEVICE BATCH SIZE`` (torchrun's)."""
    if len(argv) != 6 or argv[0] != "ddp-worker":
        raise SystemExit("usage: python -m affectfast.doctor ddp-worker SHARDS FOLDER cpu|cuda B S")
    _, shards, folder, device, batch, size = argv
    ddp_worker(Path(shards), Path(folder), device == "cuda", int(batch), int(size))


if __name__ == "__main__":
    _main(sys.argv[1:])
