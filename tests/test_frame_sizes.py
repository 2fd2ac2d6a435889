"""A pack whose frames differ in size: pack records the sizes, every command meets it cleanly."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from affectfast.config import EvalConfig, TrainConfig
from affectfast.loaders import build_loader
from affectfast.pack import PackConfig, pack
from affectfast.predict import evaluate
from affectfast.shards import MANIFEST
from affectfast.synth import SynthConfig, synthesize
from affectfast.tasks import TASKS
from affectfast.train import train

SIZE = 64
RESIZED = {0: (48, 48), 1: (60, 80)}  # frame number % 3 -> (height, width); 2 keeps 64x64


@pytest.fixture(scope="module")
def mixed_pack(tmp_path_factory):
    """A synthetic tree with a third of its frames re-encoded at 48x48 and a third at 60x80."""
    root = tmp_path_factory.mktemp("mixed")
    tree = synthesize(
        SynthConfig(out=root / "tree", videos=4, frames=24, seed=1, image_size=SIZE, workers=1)
    )
    for path in sorted((tree / "cropped_aligned").rglob("*.jpg")):
        size = RESIZED.get(int(path.stem) % 3)
        if size:
            with Image.open(path) as image:
                resized = image.resize((size[1], size[0]), Image.BILINEAR)
            out = io.BytesIO()
            resized.save(out, "JPEG", quality=90)
            path.write_bytes(out.getvalue())
    shards = root / "shards"
    pack(PackConfig(root=tree, out=shards, workers=1, shard_size=64), progress=False)
    return shards


def test_manifest_records_every_frame_size(mixed_pack):
    manifest = json.loads((mixed_pack / MANIFEST).read_text())
    for entry in manifest["splits"].values():
        assert set(entry["frame_sizes"]) == {"48x48", "60x80", "64x64"}
        assert sum(entry["frame_sizes"].values()) == entry["samples"]


@pytest.mark.parametrize("kind", ("dali-cpu", "wds"))
@pytest.mark.parametrize("augment", (False, True))
def test_loaders_give_uniform_batches(mixed_pack, kind, augment):
    from affectfast.config import AugmentSpec

    loader = build_loader(
        kind,
        mixed_pack,
        "train",
        TASKS,
        16,
        image_size=SIZE,
        augment=AugmentSpec() if augment else None,
        num_threads=1,
    )
    shapes = {tuple(batch.images.shape) for batch in loader}
    assert shapes == {(16, 3, SIZE, SIZE)}


def test_train_and_evaluate_on_mixed_sizes(mixed_pack, tmp_path):
    """Training augments (resize, then rotate); validation and evaluate resize alone."""
    config = TrainConfig(
        shards=mixed_pack,
        out=tmp_path / "run",
        epochs=1,
        batch_size=16,
        image_size=SIZE,
        loader="dali-cpu",
        num_threads=1,
        amp="off",
        device="cpu",
    )
    (record,) = train(config)
    assert record["frames_va"] > 0 and torch.isfinite(torch.tensor(record["train_loss"]))
    metrics = evaluate(EvalConfig(tmp_path / "run" / "last.pt", mixed_pack, loader="dali-cpu"))
    assert metrics["p_mtl"] == pytest.approx(record["p_mtl"], abs=1e-6)
