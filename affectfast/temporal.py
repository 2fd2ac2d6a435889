"""A temporal checkpoint's per-frame outputs on one split: what evaluate and predict score or write.

The head reads features, not JPEGs: the feature folder given (``--features``, checked to come from
this pack and from the frame checkpoint the head was trained on), else the split's features
extracted on the fly into a temporary folder with that frame checkpoint (named in the temporal
checkpoint, checked against its sha256). The outputs are those of every frame with an image
(overlapping windows averaged, :func:`sequence.predict_rows`), as a :class:`Predictions` of the
same kinds ``train.predict_split`` gives, so the rest of evaluate and predict (complete, smooth,
score or write, check) is the frame model's path unchanged (docs/temporal.md).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from affectfast.config import EvalConfig, ExtractConfig
from affectfast.errors import DataError
from affectfast.extract import extract_features
from affectfast.features import check_source, load_manifest, load_split, pack_sha256
from affectfast.metrics import Predictions
from affectfast.safe_files import sha256_file
from affectfast.sequence import predict_rows
from affectfast.train_temporal import load_temporal_checkpoint, split_predictions


def temporal_predictions(
    config: EvalConfig, checkpoint: dict
) -> tuple[Predictions, tuple[str, ...]]:
    """(every image frame's outputs, labels and masks on ``config.split``; the head's tasks)."""
    model, head, checkpoint = load_temporal_checkpoint(config.checkpoint)
    source = checkpoint["features"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _feature_folder(config, source) as folder:
        manifest = load_manifest(folder)
        check_source(
            folder,
            manifest,
            checkpoint_sha256=source["checkpoint"]["sha256"],
            pack_sha256=pack_sha256(config.shards),
        )
        split = load_split(folder, config.split, manifest)
        outputs = predict_rows(
            model.to(device),
            split,
            head.window,
            head.stride,
            device,
            progress=lambda batches: tqdm(batches, desc=f"{config.split} windows", leave=False),
        )
        preds = split_predictions(split, outputs, head.tasks)
    return preds, tuple(head.tasks)


@contextlib.contextmanager
def _feature_folder(config: EvalConfig, source: dict) -> Iterator[Path]:
    """``config.features``, else ``config.split`` extracted into a temporary folder (removed after)."""
    if config.features is not None:
        yield config.features
        return
    frame_checkpoint = Path(source["checkpoint"]["path"])
    if not frame_checkpoint.is_file():
        raise DataError(
            config.checkpoint,
            f"its frame checkpoint {frame_checkpoint} is gone: pass --features (a folder "
            "extract wrote with it), or put the frame checkpoint back",
        )
    if sha256_file(frame_checkpoint, what="checkpoint") != source["checkpoint"]["sha256"]:
        raise DataError(
            frame_checkpoint,
            "not the frame checkpoint this temporal head was trained on (its sha256 changed): "
            "pass --features (the folder extract wrote with the original)",
        )
    with tempfile.TemporaryDirectory(prefix="affectfast-features-") as scratch:
        out = Path(scratch) / "features"
        extract_features(
            ExtractConfig(
                checkpoint=frame_checkpoint,
                shards=config.shards,
                out=out,
                splits=(config.split,),
                loader=config.loader,
                batch_size=config.batch_size,
                num_threads=config.num_threads,
            )
        )
        yield out
