"""The DALI pipeline itself, on hand-made tars: reader semantics, the one-matrix geometry, keys."""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wds2idx import IndexCreator

from affectfast.config import AugmentSpec
from affectfast.errors import DataError
from affectfast.loaders import LoaderConfig, build_loader
from affectfast.loaders.base import normalize
from affectfast.loaders.dali import (
    DEVICE_BYTES_PER_PIXEL,
    FRAME_PERCENTILE,
    SENTINEL,
    LoaderFailure,
    _percentile,
    build_pipeline,
    dali_failure,
    ships_uint8,
    split_geometry,
)
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
    _, va, expr, _, _ = (out.as_array() for out in multi.run())  # images, labels, sizes, keys
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
    assert geometry.resize and geometry.sizes == {(HEIGHT, WIDTH)}
    assert geometry.typical == (HEIGHT, WIDTH)  # what the GPU decoder's buffers are sized for


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


def test_a_fixed_quarter_turn_puts_the_edge_across(handmade):
    """fixed_angle (the pixel checks' rotation): 48x64 frames resized to 32 px and turned by 90
    degrees: the dark and bright halves are top and bottom, each uniform, with no black corner."""
    pipe = build_pipeline(
        _config(handmade, batch_size=10), split_shards(handmade, "train"), fixed_angle=90.0
    )
    red = pipe.run()[0].as_array()[..., 0]
    top, bottom = red[:, 1:15, 1:31], red[:, 17:31, 1:31]
    assert (
        np.minimum(top, bottom).max(axis=(1, 2)) < np.maximum(top, bottom).min(axis=(1, 2))
    ).all()
    assert np.allclose(top, top[:, :1, :1], atol=0.1) and np.allclose(
        bottom, bottom[:, :1, :1], atol=0.1
    )


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


def test_dali_cpu_bound_for_a_gpu_ships_uint8_normalized_alike(handmade):
    """dali-cpu feeding a GPU ships uint8 and normalizes after the copy: the same floats as DALI's
    own normalize (float rounding apart), augmentation included (its draws are seeded alike)."""
    spec = AugmentSpec(degrees=30)
    shards = split_shards(handmade, "train")
    floats = build_pipeline(_config(handmade, augment=spec), shards).run()[0].as_array()
    bound = _config(handmade, augment=spec, device=torch.device("cuda"))
    assert ships_uint8(bound) and not ships_uint8(_config(handmade))
    pixels = build_pipeline(bound, shards).run()[0].as_array()  # built and run on the CPU
    assert pixels.dtype == np.uint8 and pixels.shape == floats.shape
    np.testing.assert_allclose(
        normalize(torch.from_numpy(pixels), torch.float32).numpy(), floats, atol=1e-5
    )


def test_a_cpu_run_yields_dalis_normalized_floats_unchanged(handmade):
    """On the CPU the batch is DALI's float32 normalize itself: no uint8 round trip."""
    config = _config(handmade, batch_size=10)
    (images, *_) = build_pipeline(config, split_shards(handmade, "train")).run()
    (batch,) = build_loader(
        "dali-cpu", handmade, "train", ("va", "expr"), 10, image_size=32, shuffle=False
    )
    assert torch.equal(batch.images.permute(0, 2, 3, 1), torch.from_numpy(images.as_array()))


def test_the_decoder_buffers_are_sized_for_the_frames(handmade):
    """nvJPEG's paddings scale with the split's frames (48x64 here), not ImageNet's 16/8 MiB."""
    geometry = split_geometry(_config(handmade))
    assert geometry.device_padding == math.ceil(DEVICE_BYTES_PER_PIXEL * HEIGHT * WIDTH)
    assert 10_000 < geometry.device_padding < 20_000 and geometry.host_padding < 12_000


def test_typical_frame_size_ignores_the_rare_largest():
    sizes = {(112, 112): 9980, (128, 96): 19, (600, 800): 1}
    assert _percentile(sizes, 0, FRAME_PERCENTILE) == 128
    assert _percentile(sizes, 1, FRAME_PERCENTILE) == 112
    assert _percentile({(50, 60): 1}, 1, FRAME_PERCENTILE) == 60


# --- failures: data reasons are DataErrors, the rest say what failed ---------------------------


@pytest.fixture
def handmade_copy(handmade, tmp_path):
    return Path(shutil.copytree(handmade, tmp_path / "copy"))


def _epoch(folder, **kw):
    kw = {"image_size": 32, **kw}
    return list(build_loader("dali-cpu", folder, "train", ("va", "expr"), 4, **kw))


def test_an_index_unlike_its_tar_is_a_data_error_naming_the_index(handmade_copy):
    idx = handmade_copy / "train-000000.idx"
    lines = idx.read_text().splitlines()
    fields = lines[3].split()  # the third sample: its jpg beyond the end of the tar
    fields[1] = str(512 * 10**6)
    idx.write_text("\n".join(lines[:3] + [" ".join(fields)] + lines[4:]) + "\n")
    with pytest.raises(DataError, match="offset is outside of the archive") as error:
        _epoch(handmade_copy)
    assert error.value.path == idx and "--decode" in str(error.value)


def test_an_image_that_is_no_jpeg_is_a_data_error(handmade_copy):
    tar = handmade_copy / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as f:
        member = [m for m in f if m.name.endswith(".jpg")][2]
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    data[member.offset_data : member.offset_data + len(gif.getvalue())] = gif.getvalue()
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match="nvImageCodec failure: '#4'") as error:
        _epoch(handmade_copy)
    assert error.value.path == tar  # the pack's only shard


def test_running_out_of_host_memory_is_not_a_damaged_shard(handmade):
    # 20M px squares: petabytes, beyond any address space: DALI's resize meets std::bad_alloc.
    with pytest.raises(LoaderFailure, match="the host ran out of memory") as error:
        _epoch(handmade, image_size=20_000_000)
    assert "std::bad_alloc" in str(error.value) and "verify" not in str(error.value)


def test_the_command_line_reports_a_system_failure_in_one_line_with_exit_code_1(packed):
    # The same resize to 20M px squares, through `affectfast bench loaders` in its own process:
    # one line naming what failed, exit 1 (the input is fine), no traceback.
    done = subprocess.run(
        [sys.executable, "-m", "affectfast", "bench", "loaders", str(packed)]
        + ["--loaders", "dali-cpu", "--image-size", "20000000", "--seconds", "0.1"]
        + ["--batch-size", "4", "--num-threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: DALI stopped reading {packed}: the host ran out of memory")
    assert "Traceback" not in done.stderr


# Reasons as DALI 2.4 words them on a GPU node (include/dali/core/cuda_error.h; nvImageCodec's
# status in DALI's CHECK_NVIMGCODEC), in the envelope its pipeline errors come in.
GPU_REASONS = [
    (
        "CUDA runtime API error cudaErrorMemoryAllocation (2):\nout of memory",
        "GPU ran out of memory",
    ),
    ("Can't allocate 536870912 bytes on device 0.", "GPU ran out of memory"),
    ("CUDA driver API error CUDA_ERROR_OUT_OF_MEMORY (2):\nout of memory", "GPU ran out of memory"),
    ("nvImageCodec failure: '#5'", "decoder ran out of memory"),
    ("nvImageCodec failure: '#6'", "nvImageCodec \\(nvJPEG\\) failure"),
    ("nvImageCodec failure: '#21'", "nvImageCodec \\(nvJPEG\\) failure"),
    (
        "CUDA runtime API error cudaErrorInsufficientDriver (35):\nCUDA driver version is "
        "insufficient for CUDA runtime version",
        "CUDA driver problem",
    ),
    (
        "CUDA driver API error CUDA_ERROR_ILLEGAL_ADDRESS (700):\nan illegal memory access",
        "a CUDA error",
    ),
    ("Can't allocate 1073741824 bytes on host.", "host ran out of memory"),
]


@pytest.mark.parametrize("reason,said", GPU_REASONS)
def test_gpu_failures_say_what_they_are(handmade, reason, said):
    envelope = (
        "Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\n"
        "which was used in the pipeline definition with the following traceback:\n\n"
        '  File "/data/driver/affectfast/loaders/dali.py", line 180\n\nencountered:\n\n'
        f"{reason}\nCurrent pipeline object is no longer valid."
    )
    shards = split_shards(handmade, "train")
    failure = dali_failure(RuntimeError(envelope), shards, handmade)
    assert isinstance(failure, LoaderFailure) and re.search(said, str(failure))
    assert "\n" not in str(failure) and str(handmade) in str(failure)


def test_a_decoder_failure_naming_its_sample_is_a_data_error(handmade):
    """nvImageCodec's per-sample failure names the sample (source info): a DataError there."""
    shards = split_shards(handmade, "train")
    tar = shards[0].tar
    reason = f"Failed to decode sample #2 : {tar}:3584:vid0/00003.jpg"
    failure = dali_failure(RuntimeError(f"pipeline\nencountered:\n{reason}"), shards, handmade)
    assert isinstance(failure, DataError) and failure.path == tar


# --- the GPU path (skipped without CUDA) ------------------------------------------------------


def _gpu_and_cpu_images(handmade, **kw):
    shards = split_shards(handmade, "train")
    images = []
    for kind, device in (("dali-gpu", "cuda"), ("dali-cpu", "cpu")):
        config = _config(handmade, kind=kind, device=torch.device(device), batch_size=10)
        pipe = build_pipeline(config, shards, **kw)
        images.append(
            pipe.run()[0].as_cpu().as_array() if kind == "dali-gpu" else pipe.run()[0].as_array()
        )
    return images


@pytest.mark.gpu
@pytest.mark.parametrize("fixed_angle", (None, 90.0))
def test_gpu_resize_and_rotation_give_the_cpu_pixels(handmade, fixed_angle):
    """48x64 frames resized to 32 px (and rotated by 90 degrees) on the GPU: per frame within a
    couple of grey levels of the CPU pipeline (nvJPEG vs libjpeg-turbo), the edge where the
    geometry puts it."""
    gpu, cpu = _gpu_and_cpu_images(handmade, fixed_angle=fixed_angle)
    assert gpu.shape == cpu.shape == (10, 32, 32, 3)
    diff = np.abs(gpu - cpu).reshape(10, -1)
    assert (diff.mean(axis=1) < 0.05).all() and (diff.max(axis=1) < 0.5).all(), diff.max(axis=1)
    red = gpu[..., 0]
    if fixed_angle is None:  # dark left half, bright right half
        assert (red[:, :, :14].max(axis=(1, 2)) < red[:, :, 18:].min(axis=(1, 2))).all()
    else:  # turned a quarter: the halves are top and bottom now
        top, bottom = red[:, 2:14, 2:30], red[:, 18:30, 2:30]
        assert (
            np.minimum(top, bottom).max(axis=(1, 2)) < np.maximum(top, bottom).min(axis=(1, 2))
        ).all()


@pytest.mark.gpu
def test_gpu_loader_puts_labels_and_masks_on_the_device(handmade):
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
            shuffle=False,
            drop_last=False,
            with_keys=True,
        )
    )
    assert [len(b) for b in batches] == [4, 4, 2]
    for b in batches:
        assert b.images.is_cuda and b.images.dtype == torch.bfloat16
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert all(t.is_cuda for t in (*b.labels.values(), *b.masks.values()))
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"vid{i % 2}/{i + 1:05d}" for i in range(10)]
    va = torch.cat([b.labels["va"] for b in batches]).cpu()
    va_mask = torch.cat([b.masks["va"] for b in batches]).cpu()
    expr = torch.cat([b.labels["expr"] for b in batches]).cpu()
    expr_mask = torch.cat([b.masks["expr"] for b in batches]).cpu()
    assert va_mask.tolist() == [bool(i % 2) for i in range(10)]
    assert expr_mask.tolist() == [not i % 2 for i in range(10)]
    expected_va = [[i / 10, -i / 10] if i % 2 else [0.0, 0.0] for i in range(10)]
    assert torch.allclose(va, torch.tensor(expected_va))
    assert expr.tolist() == [0 if i % 2 else i % 8 for i in range(10)]


@pytest.mark.gpu
def test_gpu_batches_follow_torchs_current_stream(handmade):
    """Batches taken while a side stream is current (share_outputs binds them to it) hold the
    same pixels as batches taken on the default stream."""

    def images():
        loader = build_loader(
            "dali-gpu",
            handmade,
            "train",
            ("va",),
            5,
            image_size=32,
            device="cuda",
            shuffle=False,
            drop_last=False,
        )
        return torch.cat([b.images.float().cpu() for b in loader])

    plain = images()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        taken = images()
    torch.cuda.synchronize()
    assert torch.equal(plain, taken)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ("dali-cpu", "wds"))
def test_cpu_kinds_bound_for_a_gpu_give_their_cpu_batches(handmade, kind):
    """dali-cpu (uint8 through pinned memory, normalized on the GPU) and wds (a pinning
    DataLoader) on a GPU: the batches of their CPU runs, on the device."""

    def batches(device):
        return list(
            build_loader(
                kind,
                handmade,
                "train",
                ("va", "expr"),
                4,
                image_size=32,
                device=device,
                shuffle=False,
                drop_last=False,
                with_keys=True,
            )
        )

    for on_gpu, on_cpu in zip(batches("cuda"), batches("cpu"), strict=True):
        assert on_gpu.images.is_cuda and on_gpu.keys == on_cpu.keys
        assert on_gpu.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(on_gpu.images.cpu(), on_cpu.images, atol=1e-5)
        for task in ("va", "expr"):
            assert torch.equal(on_gpu.labels[task].cpu(), on_cpu.labels[task])
            assert torch.equal(on_gpu.masks[task].cpu(), on_cpu.masks[task])
