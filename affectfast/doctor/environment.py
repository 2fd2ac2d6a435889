"""Check 1, the environment: GPUs, driver, CUDA, DALI, torch, CPUs, and the container's ``video``
capability; and the NVML calls doctor makes (through ctypes)."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from affectfast.doctor.check import PASSED, Check


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

    def handle_by_uuid(self, uuid: str) -> ctypes.c_void_p:
        """NVML's handle of the GPU or MIG slice NVML names ``uuid`` ("GPU-..." or "MIG-...")."""
        handle = ctypes.c_void_p()
        self._check("nvmlDeviceGetHandleByUUID", uuid.encode(), ctypes.byref(handle))
        return handle

    def is_mig(self, handle) -> bool:
        """Whether ``handle`` is a MIG slice, or a whole GPU in MIG mode: NVML reports no engine
        utilisation (NVJPG included) for either."""
        flag, current, pending = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
        is_mig_handle = getattr(self.lib, "nvmlDeviceIsMigDeviceHandle", None)
        if is_mig_handle is not None and is_mig_handle(handle, ctypes.byref(flag)) == 0:
            if flag.value:
                return True
        get_mode = getattr(self.lib, "nvmlDeviceGetMigMode", None)
        if get_mode is None:
            return False
        code = get_mode(handle, ctypes.byref(current), ctypes.byref(pending))
        return code == self.SUCCESS and current.value != 0  # 0: NVML_DEVICE_MIG_DISABLE

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


def nvml_uuids(cuda_uuid: str) -> tuple[str, ...]:
    """NVML's names for the device CUDA calls ``cuda_uuid``, most likely first.

    torch prints a device's UUID bare (8-4-4-4-12 hex digits); NVML prefixes it: ``GPU-`` for a
    whole GPU, ``MIG-`` for a MIG slice (NVML's and CUDA_VISIBLE_DEVICES' form since driver R470).
    A UUID that already carries a prefix is NVML's name as it stands.
    """
    if cuda_uuid.startswith(("GPU-", "MIG-")):
        return (cuda_uuid,)
    return (f"GPU-{cuda_uuid}", f"MIG-{cuda_uuid}")


@dataclass(frozen=True)
class NvmlDevice:
    """The device doctor samples, as NVML knows it."""

    handle: object
    uuid: str  # NVML's name: GPU-... or MIG-...
    mig: bool  # a MIG slice, or a GPU in MIG mode: NVML reports no NVJPG utilisation for it


def find_device(nvml: Nvml, cuda_uuid: str) -> NvmlDevice:
    """The NVML device CUDA calls ``cuda_uuid``, trying each of NVML's names for it; an OSError
    naming them when NVML knows none."""
    errors = []
    for uuid in nvml_uuids(cuda_uuid):
        try:
            handle = nvml.handle_by_uuid(uuid)
        except OSError as error:
            errors.append(str(error))
            continue
        return NvmlDevice(handle, uuid, uuid.startswith("MIG-") or nvml.is_mig(handle))
    raise OSError(
        f"NVML knows no device {' or '.join(nvml_uuids(cuda_uuid))} ({'; '.join(errors)})"
    )


def open_device_nvml(device: torch.device) -> tuple[Nvml | None, NvmlDevice | None, str]:
    """(NVML, the device, "") to sample ``device``'s NVJPG with; else (None, the device or None,
    why not). Never raises: without the readings the hardware decoder check is "not run", and
    the decode measurements it judges are kept."""
    nvml, why = open_nvml()
    if nvml is None:
        return None, None, why
    try:
        found = find_device(nvml, str(torch.cuda.get_device_properties(device).uuid))
    except Exception as error:  # noqa: BLE001 - any failure costs only the NVJPG readings
        nvml.close()
        return None, None, f"NVML has no handle for this GPU ({type(error).__name__}: {error})"
    if found.mig:
        nvml.close()
        return (
            None,
            found,
            f"{found.uuid} is a MIG slice (or a GPU in MIG mode), where NVML reports no NVJPG "
            "utilisation",
        )
    return nvml, found, ""


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
                "uuid": str(props.uuid),  # as CUDA reports it (bare hex), for a MIG slice its own
            }
        )
    env["gpus"] = gpus
    env["bf16"] = (
        torch.cuda.is_bf16_supported(including_emulation=False)
        if torch.cuda.is_available()
        else None
    )
    env["driver"] = env["driver_cuda"] = None
    nvml, env["nvml"] = open_nvml()
    if nvml is not None:
        try:
            env["driver"], env["driver_cuda"] = nvml.driver_version(), nvml.cuda_driver_version()
        except OSError as error:
            env["nvml"] = str(error)
        nvml.close()
    if device.type == "cuda":
        nvml, found, why = open_device_nvml(device)
        if nvml is not None:
            nvml.close()
        env["nvml_device"] = found.uuid if found is not None else why
        env["mig"] = found.mig if found is not None else None
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
    if device.type == "cuda" and env["dali_cuda_runtime"] == -1:
        warnings.append("DALI finds no CUDA runtime: its GPU operators cannot run.")
    if env.get("mig"):
        warnings.append(
            f"{env['nvml_device']} is a MIG slice (or a GPU in MIG mode): NVML reports no NVJPG "
            "utilisation there, so check 2b cannot run; whether the slice has a JPEG engine at "
            "all depends on its MIG profile (media engines)."
        )
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
