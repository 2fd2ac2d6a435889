"""Check 2: decode-only throughput over DALI threads (and ``hw_decoder_load`` on the GPU), and
whether the hardware JPEG decoder (NVJPG) is in use."""

from __future__ import annotations

import gc
import statistics
import threading
import time
from pathlib import Path

import torch

from affectfast.config import TrainConfig
from affectfast.doctor.check import FAILED, NOT_RUN, PASSED, Check, no_cuda_reason, not_run
from affectfast.doctor.environment import Nvml, open_device_nvml
from affectfast.doctor.plan import Plan, sync
from affectfast.loaders import build_loader
from affectfast.tasks import TASKS

WINDOW = 4  # batches per timing window of the decode measurement
DECODE_TIE = 0.05  # decode settings within 5% of the fastest count as equally fast


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


def recommend(rows: list[dict], default_load: float) -> dict:
    """The decode settings to train with, from the sweep's rows: the fastest; among rows within
    DECODE_TIE of it, the fewest threads (CPUs left to the rest), then the hw_decoder_load
    nearest the default."""
    fastest = max(r["images_per_s"] for r in rows)
    close = [r for r in rows if r["images_per_s"] >= (1 - DECODE_TIE) * fastest]
    pick = min(close, key=lambda r: (r["threads"], abs(r["hw_decoder_load"] - default_load)))
    return {
        "hw_decoder_load": pick["hw_decoder_load"],
        "num_threads": pick["threads"],
        "images_per_s": pick["images_per_s"],
        "fastest_images_per_s": fastest,
    }


def train_command(shards: str, choice: dict) -> str:
    """The copy-paste ``affectfast train`` line with the recommended decode settings."""
    return (
        f"affectfast train {shards} --out RUN_DIR --hw-decoder-load "
        f"{choice['hw_decoder_load']:g} --num-threads {choice['num_threads']}"
    )


def check_decode(shards: Path, plan: Plan, train_shards: str = "SHARDS") -> list[Check]:
    """Decode-only images/s over DALI threads (and hw_decoder_load on the GPU); the NVJPG verdict;
    on the GPU, the settings to train with as an ``affectfast train`` line (for ``train_shards``).
    """
    criterion = "every configuration decoded; images/s is the median of timed windows"
    hw_title = "hardware JPEG decoder (hw_decoder_load sweep)"
    hw_criterion = (
        "NVML reads NVJPG utilisation > 0 while hw_decoder_load=1.0 decodes (direct evidence); "
        "a throughput gain at 1.0 over 0 alone only suggests it"
    )
    nvml, found, why = open_device_nvml(plan.device) if plan.cuda else (None, None, "")
    handle = found.handle if nvml is not None else None
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
    summary = f"best {best['images_per_s']:,.0f} images/s ({best['threads']} threads" + (
        f", hw_decoder_load {best['hw_decoder_load']:g})" if plan.cuda else ")"
    )
    details: dict = {"rows": rows, "recommendation": None}
    if not plan.cuda:
        body += [
            "",
            "No decode settings are recommended on the CPU: there the model step, not decoding, "
            "limits training (check 3).",
        ]
    else:
        default_load = TrainConfig.hw_decoder_load  # the dataclass default: train's
        choice = recommend(rows, default_load)
        choice["command"] = train_command(train_shards, choice)
        details["recommendation"] = choice
        summary += (
            f"; best to train with: --hw-decoder-load {choice['hw_decoder_load']:g} "
            f"--num-threads {choice['num_threads']}"
        )
        body += [
            "",
            f"Train with the settings measured best here (the fastest, or among configurations "
            f"within {DECODE_TIE:.0%} of it the one with the fewest threads):",
            "",
            f"    {choice['command']}",
            "",
            f"(train's defaults: hw_decoder_load {default_load:g}, DALI threads = "
            "this process's CPUs; under torchrun with k processes on a node each gets 1/k of "
            "them). They matter only where check 3 shows training waiting on the loader "
            "(overhead above 1)"
            + (
                ""
                if train_shards != "SHARDS"
                else "; measured on doctor's synthesized frames: run `affectfast doctor SHARDS` "
                "to measure on yours"
            )
            + ".",
        ]
    decode = Check(
        "decode",
        f"decode-only throughput ({plan.kind})",
        PASSED,
        summary,
        criterion,
        details,
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
