"""build_loader over the small packed fixture: every kind yields the same epoch (docs/design.md §3)."""

from __future__ import annotations

import shutil
import tarfile

import numpy as np
import pytest
import torch

from affectfast.config import AugmentSpec
from affectfast.errors import DataError
from affectfast.loaders import build_loader
from affectfast.loaders.base import IMAGENET_MEAN, IMAGENET_STD
from affectfast.shards import load_manifest
from affectfast.tasks import LABEL_EXT, TASKS, decode_label

CPU_KINDS = ("dali-cpu", "wds", "files")
SIZE = 64  # the fixture's native frame size: no resampling with augmentation off
BATCH = 16


def epoch(kind, packed, tree, split="val", tasks=TASKS, **kw):
    """All batches of one epoch (keys on)."""
    kw = {"image_size": SIZE, "with_keys": True, "num_threads": 1, **kw}
    return list(build_loader(kind, packed, split, tasks, BATCH, tree=tree, **kw))


def by_key(batches):
    """key -> (image HWC uint8-scale float, {task: (label, mask)})."""
    out = {}
    mean = torch.tensor(IMAGENET_MEAN) * 255
    std = torch.tensor(IMAGENET_STD) * 255
    for b in batches:
        pixels = b.images.float().permute(0, 2, 3, 1) * std + mean
        for i, key in enumerate(b.keys):
            assert key not in out, f"{key} yielded twice"
            out[key] = (pixels[i], {t: (b.labels[t][i], bool(b.masks[t][i])) for t in b.labels})
    return out


def shard_truth(packed, split):
    """key -> {ext: bytes} read straight from the tars with tarfile."""
    truth = {}
    for entry in load_manifest(packed)["splits"][split]["shards"]:
        with tarfile.open(packed / entry["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                truth.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return truth


@pytest.fixture(scope="module")
def val_epochs(packed, synth_tree):
    """One validation epoch, augmentation off, of every CPU kind (multi-task)."""
    return {kind: by_key(epoch(kind, packed, synth_tree)) for kind in CPU_KINDS}


def test_kinds_yield_the_same_keys_labels_and_masks(val_epochs, packed):
    truth = shard_truth(packed, "val")
    for kind, samples in val_epochs.items():
        assert sorted(samples) == sorted(truth), kind
        for key, (_, labels) in samples.items():
            for task in TASKS:
                value, mask = labels[task]
                raw = truth[key].get(LABEL_EXT[task])
                assert mask == (raw is not None), (kind, key, task)
                if raw is None:
                    assert not value.any(), "a missing label reads as 0"
                else:
                    expected = decode_label(task, raw).astype(np.float32)
                    np.testing.assert_allclose(value.numpy().reshape(-1), expected, atol=1e-6)


def test_masks_cover_samples_lacking_a_task(val_epochs):
    masks = {t: [labels[t][1] for _, labels in val_epochs["dali-cpu"].values()] for t in TASKS}
    # The fixture's val split has frames without EXPR (and the multi-task loader keeps them).
    assert not all(masks["expr"]) and any(masks["expr"])


def test_dali_and_torchvision_images_agree(val_epochs):
    dali, wds, files = (val_epochs[k] for k in CPU_KINDS)
    for key, (image, _) in wds.items():
        # Same bytes, same decoder (PIL): wds and files are identical.
        assert torch.equal(image, files[key][0])
        # DALI's libjpeg-turbo vs PIL's: within a couple of grey levels (IDCT/upsampling rounding).
        diff = (image - dali[key][0]).abs()
        assert diff.mean() < 1.0 and diff.max() <= 12, (key, diff.mean(), diff.max())


@pytest.mark.parametrize("task", TASKS)
def test_uni_task_counts_equal_the_manifest(packed, synth_tree, task):
    stats = load_manifest(packed)["splits"]["val"]["stats"]
    for kind in CPU_KINDS:
        batches = epoch(kind, packed, synth_tree, tasks=(task,))
        assert sum(len(b) for b in batches) == stats[task]["valid"], kind
        assert all(b.masks[task].all() for b in batches), "uni-task frames all carry the label"


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_two_ranks_cover_every_sample_once(packed, synth_tree, kind):
    samples = load_manifest(packed)["splits"]["train"]["samples"]
    # Evaluation: every sample exactly once across ranks, no padding duplicate.
    parts = [
        epoch(
            kind, packed, synth_tree, "train", rank=r, world_size=2, shuffle=False, drop_last=False
        )
        for r in range(2)
    ]
    keys = [k for part in parts for b in part for k in b.keys]
    assert len(keys) == len(set(keys)) == samples
    # Training: disjoint, and the same number of full batches on both ranks.
    loaders = [
        build_loader(
            kind,
            packed,
            "train",
            TASKS,
            BATCH,
            image_size=SIZE,
            rank=r,
            world_size=2,
            with_keys=True,
            num_threads=2,
            tree=synth_tree,
        )
        for r in range(2)
    ]
    parts = [list(loader) for loader in loaders]
    assert [len(p) for p in parts] == [len(loaders[0])] * 2 == [(samples // 2) // BATCH] * 2
    assert all(len(b) == BATCH for p in parts for b in p)
    keys = [k for p in parts for b in p for k in b.keys]
    assert len(keys) == len(set(keys))


def _train_loader(packed, kind, **kw):
    options = dict(image_size=SIZE, with_keys=True, num_threads=1, seed=3)
    return build_loader(kind, packed, "train", ("va",), BATCH, **{**options, **kw})


def _keys(loader, epoch):
    loader.set_epoch(epoch)
    return [k for b in loader for k in b.keys]


def test_wds_set_epoch_replays_any_epoch(packed):
    """wds builds each epoch afresh: its order is a function of (seed, epoch)."""
    loader = _train_loader(packed, "wds")
    first = _keys(loader, 0)
    assert _keys(loader, 1) != first and _keys(loader, 0) == first


def test_dali_epochs_reshuffle_in_order_and_resume_from_state(packed):
    """DALI builds its pipeline once: epochs run in order, each a new order, the same for the
    same seed; state_dict() at an epoch boundary continues the sequence exactly."""
    loader = _train_loader(packed, "dali-cpu")
    orders = [_keys(loader, e) for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert all(len(o) == len(set(o)) == len(loader) * BATCH for o in orders)
    with pytest.raises(ValueError, match="next epoch is 3"):
        loader.set_epoch(0)
    again = _train_loader(packed, "dali-cpu")
    assert _keys(again, 0) == orders[0]  # a function of the seed
    state = again.state_dict()
    resumed = _train_loader(packed, "dali-cpu")
    resumed.load_state_dict(state)
    assert [_keys(resumed, e) for e in (1, 2)] == orders[1:]


def test_dali_loader_epoch_is_the_readers_epoch(packed):
    """Epoch e of the loader is epoch e of its DALI reader: the loader takes every batch of the
    reader's epoch (yielding the first len() of them) and reads no further."""
    from affectfast.loaders.dali import _decode_keys, build_pipeline

    loader = _train_loader(packed, "dali-cpu")
    ours = [_keys(loader, e) for e in range(2)]
    pipe = build_pipeline(loader.config, loader.shards)
    per_epoch = -(-pipe.reader_meta("reader")["epoch_size_padded"] // BATCH)
    theirs = []
    for _ in range(2):
        outputs = [pipe.run()[-1] for _ in range(per_epoch)]  # the keys, last output
        theirs.append(
            [k for o in outputs for k in _decode_keys(torch.tensor(o.as_array()), loader.tars)]
        )
    assert ours == [t[: len(ours[0])] for t in theirs]


def test_dali_ranks_split_every_training_epoch(packed, synth_tree):
    """Two ranks: disjoint parts of one fresh order per epoch, equal batch counts."""
    loaders = [_train_loader(packed, "dali-cpu", rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        parts = [_keys(loader, epoch) for loader in loaders]
        assert len(parts[0]) == len(parts[1]) == len(loaders[0]) * BATCH
        assert not set(parts[0]) & set(parts[1])


# float16 once (on dali-cpu): the cast is shared by every kind (finish_batch).
@pytest.mark.parametrize(
    "kind,dtype",
    [(kind, dtype) for kind in CPU_KINDS for dtype in (torch.float32, torch.bfloat16)]
    + [("dali-cpu", torch.float16)],
)
def test_batch_layout_dtype_and_partial_last_batch(packed, synth_tree, kind, dtype):
    batches = epoch(
        kind,
        packed,
        synth_tree,
        tasks=("va", "expr"),
        image_size=32,
        dtype=dtype,
        augment=AugmentSpec(interpolation="linear"),
        drop_last=False,
        shuffle=False,
    )
    samples = load_manifest(packed)["splits"]["val"]["samples"]
    assert [len(b) for b in batches] == [BATCH] * (samples // BATCH) + [samples % BATCH]
    for b in batches:
        assert b.images.shape == (len(b), 3, 32, 32) and b.images.dtype == dtype
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.labels["va"].shape == (len(b), 2) and b.labels["va"].dtype == torch.float32
        assert b.labels["expr"].shape == (len(b),) and b.labels["expr"].dtype == torch.int64
        assert b.masks["va"].dtype == torch.bool
        assert b.images.float().abs().max() < 3.0  # normalized, not 0..255


def test_augmentation_changes_pixels_but_not_labels(packed, synth_tree):
    plain = by_key(epoch("dali-cpu", packed, synth_tree, tasks=("au",)))
    for interpolation in ("nearest", "linear"):
        spec = AugmentSpec(degrees=30, interpolation=interpolation)
        augmented = by_key(epoch("dali-cpu", packed, synth_tree, tasks=("au",), augment=spec))
        assert augmented.keys() == plain.keys()
        moved = sum(not torch.allclose(augmented[k][0], plain[k][0], atol=1) for k in plain)
        assert moved > len(plain) // 2
        assert all(torch.equal(augmented[k][1]["au"][0], plain[k][1]["au"][0]) for k in plain)


def test_no_op_augmentation_is_an_exact_copy(packed, synth_tree):
    plain = by_key(epoch("dali-cpu", packed, synth_tree, tasks=("va",)))
    still = by_key(
        epoch(
            "dali-cpu",
            packed,
            synth_tree,
            tasks=("va",),
            augment=AugmentSpec(flip=False, degrees=0),
        )
    )
    assert all(torch.equal(still[k][0], plain[k][0]) for k in plain)


@pytest.mark.parametrize("kind", ("dali-cpu", "wds"))
def test_truncated_shard_is_a_data_error_naming_it(packed, tmp_path, kind):
    copy = tmp_path / "shards"
    shutil.copytree(packed, copy)
    victim = copy / load_manifest(copy)["splits"]["val"]["shards"][-1]["name"]
    victim.write_bytes(victim.read_bytes()[:-3000])
    with pytest.raises(DataError, match=victim.name) as error:
        build_loader(kind, copy, "val", TASKS, BATCH)
    assert "truncated" in str(error.value)


def test_bad_arguments_are_refused(packed):
    with pytest.raises(ValueError, match="kind"):
        build_loader("dali", packed, "val", TASKS, BATCH)
    with pytest.raises(ValueError, match="tree"):
        build_loader("files", packed, "val", TASKS, BATCH)
    with pytest.raises(ValueError, match="rank"):
        build_loader("wds", packed, "val", TASKS, BATCH, rank=2, world_size=2)
    with pytest.raises(ValueError, match="interpolation"):
        AugmentSpec(interpolation="cubic")


@pytest.mark.gpu
@pytest.mark.parametrize("size", (SIZE, 48))
def test_dali_gpu_yields_what_dali_cpu_yields(packed, synth_tree, val_epochs, size):
    """The val epoch on the GPU (at the frames' own size, and resized to 48 px): the same keys,
    labels and masks, computed on the device, and per frame the CPU pixels within nvJPEG's
    rounding."""
    batches = epoch(
        "dali-gpu", packed, synth_tree, device="cuda", dtype=torch.float16, image_size=size
    )
    assert all(
        b.images.is_cuda
        and b.images.is_contiguous(memory_format=torch.channels_last)
        and b.images.dtype == torch.float16
        and b.images.shape[2:] == (size, size)
        and all(v.is_cuda for v in (*b.labels.values(), *b.masks.values()))  # built on the GPU
        for b in batches
    )
    gpu = by_key([_to_cpu(b) for b in batches])
    cpu = (
        val_epochs["dali-cpu"]
        if size == SIZE
        else by_key(epoch("dali-cpu", packed, synth_tree, image_size=size))
    )
    assert gpu.keys() == cpu.keys()
    for key, (image, labels) in gpu.items():
        assert {t: (v.tolist(), m) for t, (v, m) in labels.items()} == {
            t: (v.tolist(), m) for t, (v, m) in cpu[key][1].items()
        }
        # nvJPEG vs libjpeg-turbo, plus fp16 rounding (grey levels).
        diff = (image - cpu[key][0]).abs()
        assert diff.mean() < 1.5 and diff.max() <= 16, (key, diff.mean(), diff.max())


def _to_cpu(batch):
    batch.images = batch.images.cpu()
    batch.labels = {t: v.cpu() for t, v in batch.labels.items()}
    batch.masks = {t: v.cpu() for t, v in batch.masks.items()}
    return batch


def test_bench_loaders_command_writes_table_csv_and_plot(packed, synth_tree, tmp_path):
    from click.testing import CliRunner

    from affectfast.cli import main

    csv_path, png = tmp_path / "bench.csv", tmp_path / "bench.png"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "loaders",
            str(packed),
            "--tree",
            str(synth_tree),
            "--loaders",
            "dali-cpu,files",
            "--batch-size",
            "16",
            "--image-size",
            "32",
            "--seconds",
            "0.2",
            "--threads",
            "1",
            "--csv",
            str(csv_path),
            "--plot",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("loader,images_per_s")
    assert [r.split(",")[0] for r in rows[1:]] == ["dali-cpu", "files", "decode-only"]
    assert all(float(r.split(",")[1]) > 0 for r in rows[1:])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "damage", ["v1.2\n", "v1.2 1\njpg x 10 a/00001.jpg\n", "v1.2 1\njpg 512 10 noext\n"]
)
def test_damaged_index_is_a_data_error_naming_it(packed, tmp_path, damage):
    folder = tmp_path / "shards"
    shutil.copytree(packed, folder)
    idx = sorted(folder.glob("val-*.idx"))[0]
    idx.write_text(damage)
    with pytest.raises(DataError, match=str(idx)):
        build_loader("wds", folder, "val", TASKS, 8)


# --- the unlabelled test split --------------------------------------------------------------------


@pytest.mark.parametrize("kind", CPU_KINDS)
@pytest.mark.parametrize("tasks", [("expr",), TASKS])
def test_test_split_is_read_as_images_only_by_every_kind(packed_holdout, holdout_tree, kind, tasks):
    # A uni-task reader skipping samples without its label would yield nothing here.
    truth = shard_truth(packed_holdout, "test")
    batches = epoch(kind, packed_holdout, holdout_tree, split="test", tasks=tasks)
    keys = [key for b in batches for key in b.keys]
    assert sorted(keys) == sorted(truth) and len(keys) == len(set(keys))
    assert len(batches) == -(-len(truth) // BATCH)  # every sample once, the last batch partial
    for b in batches:
        assert set(b.labels) == set(b.masks) == set(tasks)
        assert not any(m.any() for m in b.masks.values())
        assert b.images.shape[1:] == (3, SIZE, SIZE)


def test_test_split_on_a_pack_without_one_is_a_data_error(packed, synth_tree):
    with pytest.raises(DataError, match="test"):
        build_loader("dali-cpu", packed, "test", TASKS, BATCH)
    with pytest.raises(DataError, match="no test split"):
        build_loader("files", packed, "test", TASKS, BATCH, tree=synth_tree)


def test_bench_loaders_refuses_a_hardware_decoder_share_outside_0_to_1(packed):
    from click.testing import CliRunner

    from affectfast.cli import main

    args = ["bench", "loaders", str(packed), "--loaders", "dali-cpu", "--hw-decoder-load", "1.5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--hw-decoder-load" in result.output


@pytest.mark.gpu
def test_bench_loaders_times_dali_gpu_at_each_hardware_decoder_share(packed, tmp_path):
    from click.testing import CliRunner

    from affectfast.cli import main

    for load in ("0", "1"):
        csv_path = tmp_path / f"bench-{load}.csv"
        args = ["bench", "loaders", str(packed), "--loaders", "dali-gpu", "--hw-decoder-load", load]
        args += [
            "--batch-size",
            "16",
            "--image-size",
            "32",
            "--seconds",
            "0.2",
            "--csv",
            str(csv_path),
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        rows = {r.split(",")[0]: r.split(",") for r in csv_path.read_text().splitlines()[1:]}
        assert float(rows["dali-gpu"][1]) > 0 and "decode-only-gpu" in rows
