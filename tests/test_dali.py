"""The DALI pipeline itself, on hand-made tars: reader semantics, the one-matrix geometry, keys."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from wds2idx import IndexCreator

from affectfast.config import AugmentSpec
from affectfast.loaders import LoaderConfig, build_loader
from affectfast.loaders.dali import SENTINEL, build_pipeline, split_geometry
from affectfast.shards import split_shards
from affectfast.tasks import encode_label
from tests.conftest import write_manifest

HEIGHT, WIDTH = 48, 64  # not square: the per-sample scale must use both axes


def _frame(i: int) -> bytes:
    """Left half dark, right half bright, brightness depending on i (a sharp vertical edge)."""
    pixels = np.full((HEIGHT, WIDTH, 3), 20 + i, np.uint8)
    pixels[:, WIDTH // 2 :] = 200 + i
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=98)
    return out.getvalue()


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """One 10-sample train shard: va on odd i, expr on even i, au never; key vid<i%2>/<i+1>."""
    folder = tmp_path_factory.mktemp("handmade")
    tar_path = folder / "train-000000.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(10):
            key = f"vid{i % 2}/{i + 1:05d}"
            members = {"jpg": _frame(i)}
            if i % 2:
                members["va"] = encode_label("va", [i / 10, -i / 10])
            else:
                members["expr"] = encode_label("expr", i % 8)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with IndexCreator(str(tar_path), str(folder / "train-000000.idx"), verbose=False) as index:
        index.create_index()
    return write_manifest(folder)


def _config(folder, tasks=("va", "expr"), batch_size=4, **kw) -> LoaderConfig:
    base = dict(
        kind="dali-cpu",
        shards=folder,
        split="train",
        tasks=tasks,
        batch_size=batch_size,
        image_size=32,
        augment=None,
        shuffle=False,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        dtype=torch.float32,
        with_keys=True,
        drop_last=False,
        seed=0,
        num_threads=1,
        tree=None,
    )
    return LoaderConfig(**{**base, **kw})


def test_reader_skips_or_pads_missing_labels(handmade):
    shards = split_shards(handmade, "train")
    uni = build_pipeline(_config(handmade, tasks=("va",)), shards)
    multi = build_pipeline(_config(handmade), shards)
    # "skip": only the 5 frames with va exist for the reader (never decoded otherwise).
    assert uni.reader_meta("reader")["epoch_size"] == 5
    assert multi.reader_meta("reader")["epoch_size"] == 10
    _, va, expr, _ = (out.as_array() for out in multi.run())
    assert va[0].tolist() == [SENTINEL["va"]] * 2 and expr[0, 0] == 0  # i = 0: expr only
    assert expr[1, 0] == SENTINEL["expr"] and va[1] == pytest.approx([0.1, -0.1])


def test_keys_masks_and_labels_through_the_loader(handmade):
    batches = list(
        build_loader(
            "dali-cpu",
            handmade,
            "train",
            ("va", "expr"),
            4,
            image_size=32,
            shuffle=False,
            drop_last=False,
            with_keys=True,
        )
    )
    assert [len(b) for b in batches] == [4, 4, 2]
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"vid{i % 2}/{i + 1:05d}" for i in range(10)]
    va_mask = torch.cat([b.masks["va"] for b in batches])
    assert va_mask.tolist() == [bool(i % 2) for i in range(10)]
    expr = torch.cat([b.labels["expr"] for b in batches])
    assert expr.tolist() == [0 if i % 2 else i % 8 for i in range(10)]


def test_geometry_from_the_manifest_frame_sizes(handmade):
    """Frames of 48x64 for 32 px squares: resize; at their own (square) size nothing would."""
    geometry = split_geometry(_config(handmade))
    assert geometry.resize and geometry.largest == (HEIGHT, WIDTH)


def test_decode_only_gives_native_uint8(handmade):
    pipe = build_pipeline(_config(handmade), split_shards(handmade, "train"), decode_only=True)
    (images,) = pipe.run()
    array = images.as_array()
    assert array.shape == (4, HEIGHT, WIDTH, 3) and array.dtype == np.uint8


@pytest.mark.parametrize("interpolation", ("nearest", "linear"))
def test_resize_then_warp_scales_each_axis_about_the_pixel_centres(handmade, interpolation):
    """Resize 64x48 -> 32x32 and a near-zero rotation: the edge lands at x = 16."""
    spec = AugmentSpec(flip=False, degrees=1e-4, interpolation=interpolation)
    pipe = build_pipeline(
        _config(handmade, tasks=("expr",), augment=spec, dtype=torch.float32),
        split_shards(handmade, "train"),
    )
    images = pipe.run()[0].as_array()  # normalized HWC float
    assert images.shape == (4, 32, 32, 3)
    red = images[..., 0]
    assert (red[:, :, :15] < red[:, :, 17:].min(axis=2, keepdims=True)).all()
    assert np.allclose(red[:, :, :15], red[:, :1, :1], atol=0.1)  # uniform halves, no smear


def test_flip_mirrors_the_image(handmade):
    """With flip on, each image is either the plain one or its mirror, never anything else."""
    shards = split_shards(handmade, "train")
    plain = build_pipeline(_config(handmade, batch_size=10), shards).run()[0].as_array()
    spec = AugmentSpec(flip=True, degrees=0)
    flipped = build_pipeline(_config(handmade, batch_size=10, augment=spec), shards)
    out = flipped.run()[0].as_array()
    same = [np.array_equal(o, p) for o, p in zip(out, plain)]
    mirrored = [np.array_equal(o, p[:, ::-1]) for o, p in zip(out, plain)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


@pytest.mark.gpu
def test_gpu_pipeline_decodes_on_the_device(handmade):
    config = _config(
        handmade,
        kind="dali-gpu",
        device=torch.device("cuda"),
        augment=AugmentSpec(interpolation="linear"),
    )
    pipe = build_pipeline(config, split_shards(handmade, "train"))
    images, *_ = pipe.run()
    assert type(images).__name__ == "TensorListGPU"
    batches = list(
        build_loader(
            "dali-gpu",
            handmade,
            "train",
            ("va", "expr"),
            4,
            image_size=32,
            device="cuda",
            dtype=torch.bfloat16,
            drop_last=False,
        )
    )
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(
        b.images.is_cuda
        and b.images.dtype == torch.bfloat16
        and b.images.is_contiguous(memory_format=torch.channels_last)
        for b in batches
    )
