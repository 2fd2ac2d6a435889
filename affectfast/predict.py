"""Evaluate and predict with a checkpoint: ABAW metric tables and the ABAW submission files.

``evaluate(EvalConfig)`` scores a checkpoint on a split with the same validation pass training runs
(``train.predict_split`` + ``train.score``); ``predict(EvalConfig, out)`` writes one file per video
and task in the challenge layout. The checkpoint carries the run's config (tasks, image size,
precision), so nothing else is needed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from affectfast.config import EvalConfig, TrainConfig
from affectfast.dist import setup_distributed, teardown_distributed
from affectfast.model import AffectNet
from affectfast.rundir import load_checkpoint
from affectfast.tasks import CHALLENGE_DIRS, HEADERS
from affectfast.train import (
    build_autocast,
    build_eval_loader,
    predict_split,
    resolve_device,
    score,
)


def _load_for_eval(config: EvalConfig):
    """(model, run config resolved for this machine, dist info, autocast, checkpoint)."""
    checkpoint = load_checkpoint(config.checkpoint)
    saved = TrainConfig.from_dict(checkpoint["config"])
    # The saved precision is concrete (bf16, fp16 or off): evaluate as trained; only the loader follows the machine.
    run = dataclasses.replace(
        saved, shards=config.shards, loader=config.loader, num_threads=config.num_threads
    )
    run, use_cuda = resolve_device(run)
    info = setup_distributed(use_cuda)
    model = AffectNet(run.tasks)
    model.load_state_dict(checkpoint["model"])
    model = model.to(
        info.device,
        memory_format=torch.channels_last if run.channels_last else torch.preserve_format,
    )
    return model, run, info, build_autocast(info.device, run.amp), checkpoint


def evaluate(config: EvalConfig) -> dict:
    """The checkpoint's metrics on ``config.split`` of ``config.shards`` (all ranks gathered)."""
    model, run, info, autocast, _ = _load_for_eval(config)
    try:
        loader = build_eval_loader(run, config.shards, config.split, info, config.batch_size)
        return score(
            predict_split(model, loader, autocast, info), run.tasks, config.tune_au_thresholds
        )
    finally:
        teardown_distributed()


def predict(config: EvalConfig, out: Path) -> list[Path]:
    """Write ABAW-layout prediction files: ``out/<Challenge>/<video>.txt`` per trained task and video.

    Each file has the task's annotation header and one line per frame present in the shards, in
    frame order: VA ``valence,arousal`` clipped to [-1, 1], EXPR the class index, AU twelve 0/1
    (at the checkpoint's tuned thresholds where it has them, else 0.5).
    """
    model, run, info, autocast, checkpoint = _load_for_eval(config)
    try:
        loader = build_eval_loader(run, config.shards, config.split, info, config.batch_size)
        preds = predict_split(model, loader, autocast, info)
    finally:
        teardown_distributed()
    if not info.is_main:
        return []
    thresholds = np.asarray(checkpoint.get("au_thresholds") or [0.5] * len(HEADERS["au"]))
    videos = np.asarray([k.rsplit("/", 1)[0] for k in preds.keys])
    written = []
    # Keys are sorted, so each video's frames are one contiguous, ordered range.
    names, starts = np.unique(videos, return_index=True)
    order = np.argsort(starts)  # key order, which can differ from name order ("v-2/" < "v/")
    names, starts = names[order], starts[order]
    ends = np.append(starts[1:], len(videos)).astype(int)
    for task in run.tasks:
        folder = Path(out) / CHALLENGE_DIRS[task][0]
        folder.mkdir(parents=True, exist_ok=True)
        for video, start, end in zip(names, starts, ends):
            rows = preds.outputs[task][start:end]
            written.append(_write_prediction(folder / f"{video}.txt", task, rows, thresholds))
    return written


def _write_prediction(path: Path, task: str, rows: np.ndarray, thresholds: np.ndarray) -> Path:
    if task == "va":
        lines = [f"{v:.6f},{a:.6f}" for v, a in np.clip(rows, -1, 1)]
    elif task == "expr":
        lines = [str(int(c)) for c in rows.argmax(1)]
    else:
        lines = [",".join(str(int(x)) for x in r) for r in rows > thresholds]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(",".join(HEADERS[task]) + "\n" + "".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return path
