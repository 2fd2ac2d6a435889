"""The training order contract of the shard loaders (dali-cpu, wds), at the level of samples.

Every epoch reads every sample once across ranks, in a fresh order drawn from (seed, epoch); a
frame's batch-mates change from epoch to epoch; DALI's padding never reaches a batch; a DALI run
resumed from its checkpoint continues exactly. Packs here are hand-made with given sample counts.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from wds2idx import IndexCreator

from affectfast.config import AugmentSpec
from affectfast.errors import DataError
from affectfast.loaders import build_loader
from affectfast.loaders.base import rank_share
from affectfast.shards import MANIFEST, load_manifest
from affectfast.tasks import encode_label
from tests.conftest import write_manifest

KINDS = ("dali-cpu", "wds")
SIZE = 16  # frame size: no resize at image_size=SIZE
BUFFER = 64  # a shuffle buffer smaller than a rank's part: the local shuffle is what is tested


def make_pack(folder: Path, samples: int, shard_size: int, size: int = SIZE) -> Path:
    """``samples`` train samples in shards of ``shard_size``; sample i is a uniform frame of grey
    level 20 + i % 200 with VA (i / samples, 0), key v<i // 50000>/<i % 50000 + 1>."""
    folder.mkdir(parents=True)
    for start in range(0, samples, shard_size):
        tar_path = folder / f"train-{start // shard_size:06d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(start, min(samples, start + shard_size)):
                out = io.BytesIO()
                Image.new("RGB", (size, size), (20 + i % 200,) * 3).save(out, "JPEG", quality=95)
                members = {"jpg": out.getvalue(), "va": encode_label("va", [i / samples, 0.0])}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"v{i // 50000}/{i % 50000 + 1:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with IndexCreator(str(tar_path), str(tar_path.with_suffix(".idx")), verbose=False) as idx:
            idx.create_index()
    return write_manifest(folder)


@pytest.fixture(scope="module")
def pack600(tmp_path_factory):
    """600 samples in 24 shards of 25."""
    return make_pack(tmp_path_factory.mktemp("order") / "pack", 600, 25)


@pytest.fixture(scope="module")
def pack135(tmp_path_factory):
    """135 samples in shards of 20: odd, so two ranks' parts differ by one."""
    return make_pack(tmp_path_factory.mktemp("odd") / "pack", 135, 20)


def stored_keys(pack: Path) -> list[str]:
    """Sample keys in the order the shards store them."""
    keys = []
    for entry in load_manifest(pack)["splits"]["train"]["shards"]:
        with tarfile.open(pack / entry["name"]) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".jpg")]
    return keys


def train_loader(kind: str, pack: Path, batch_size: int = 16, **kw):
    options = dict(image_size=SIZE, with_keys=True, num_threads=1, shuffle_buffer=BUFFER, seed=3)
    return build_loader(kind, pack, "train", ("va",), batch_size, **{**options, **kw})


def epoch_batches(loader, epoch: int) -> list[list[str]]:
    """The keys of each batch of ``epoch``."""
    loader.set_epoch(epoch)
    return [batch.keys for batch in loader]


def flat(batches: list[list[str]]) -> list[str]:
    return [key for batch in batches for key in batch]


@pytest.mark.parametrize("kind", KINDS)
def test_every_epoch_reads_every_sample_once_in_a_fresh_order(pack600, kind):
    everything = sorted(stored_keys(pack600))
    loader = train_loader(kind, pack600, drop_last=False)
    orders = [flat(epoch_batches(loader, e)) for e in range(3)]
    assert all(sorted(order) == everything for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    # Training batches (drop_last): full, every sample at most once, a different tail left out.
    loader = train_loader(kind, pack600)
    dropped = [flat(epoch_batches(loader, e)) for e in range(2)]
    assert all(len(keys) == len(set(keys)) == len(loader) * 16 for keys in dropped)
    assert set(everything) - set(dropped[0]) != set(everything) - set(dropped[1])


@pytest.mark.parametrize("kind", KINDS)
def test_the_order_is_a_function_of_the_seed(pack600, kind):
    first = [flat(epoch_batches(train_loader(kind, pack600, seed=s), 0)) for s in (0, 1, 0)]
    assert first[0] != first[1] and first[0] == first[2]


@pytest.mark.parametrize("kind", KINDS)
def test_batch_mates_change_from_epoch_to_epoch(pack600, kind):
    """Frames stored side by side must not share a batch epoch after epoch (a new order of the
    tars alone batches each frame with the same stored neighbours every time)."""
    stored = stored_keys(pack600)
    shard = {key: i // 25 for i, key in enumerate(stored)}
    neighbours = {(a, b) for a, b in zip(stored, stored[1:]) if shard[a] == shard[b]}
    loader = train_loader(kind, pack600)
    together = []
    for epoch in range(2):
        batch_of = {k: i for i, batch in enumerate(epoch_batches(loader, epoch)) for k in batch}
        together.append({(a, b) for a, b in neighbours if batch_of.get(a, -1) == batch_of.get(b)})
    assert len(together[0]) < 0.5 * len(neighbours)
    assert len(together[0] & together[1]) < 0.5 * len(together[0])


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_split_every_epoch_exactly(pack135, kind):
    everything = sorted(stored_keys(pack135))
    for drop_last in (False, True):
        loaders = [
            train_loader(kind, pack135, rank=r, world_size=2, drop_last=drop_last) for r in (0, 1)
        ]
        for epoch in range(3):
            parts = [flat(epoch_batches(loader, epoch)) for loader in loaders]
            assert not set(parts[0]) & set(parts[1])
            if drop_last:
                assert [len(p) for p in parts] == [(135 // 2) // 16 * 16] * 2
                assert all(len(p) == len(set(p)) for p in parts)
            else:
                assert sorted(parts[0] + parts[1]) == everything
                assert [len(p) for p in parts] == [rank_share(135, r, 2) for r in (0, 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_reaches_a_batch(pack135, kind):
    """135 samples, 2 ranks, batches of 67: rank parts of 67 and 68 samples, padded by DALI to two
    batches each; drop_last yields one batch per rank per epoch, 67 different real frames, and
    the padding batch is never the next epoch's first."""
    loaders = [train_loader(kind, pack135, 67, rank=r, world_size=2) for r in (0, 1)]
    seen = {}
    for epoch in range(3):
        for rank, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 1
            (batch,) = batches
            assert len(set(batch.keys)) == 67, (epoch, rank)
            assert len(torch.unique(batch.images[:, 0, 0, 0])) > 1  # not one frame repeated
            seen[epoch, rank] = batch.keys
        assert not set(seen[epoch, 0]) & set(seen[epoch, 1])


def test_dali_resumes_exactly_after_a_padded_epoch_end(pack135):
    """The same case: a run resumed from the checkpoint of epoch 0 continues as the run did."""
    for rank in (0, 1):
        loader = train_loader("dali-cpu", pack135, 67, rank=rank, world_size=2)
        epoch_batches(loader, 0)
        state = loader.state_dict()
        rest = [epoch_batches(loader, e) for e in (1, 2)]
        resumed = train_loader("dali-cpu", pack135, 67, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        assert [epoch_batches(resumed, e) for e in (1, 2)] == rest


def test_dali_resumes_exactly_from_its_checkpoint(pack600):
    """Two ranks, a shuffle buffer smaller than a part, augmentation on: the epochs after a saved
    state come out identical, keys and pixels (the reader's and the augmentation's draws)."""
    spec = AugmentSpec(degrees=20)
    for rank in (0, 1):
        loader = train_loader("dali-cpu", pack600, rank=rank, world_size=2, augment=spec)
        for epoch in range(2):
            epoch_batches(loader, epoch)
        state = loader.state_dict()
        rest = [_keys_and_pixels(loader, e) for e in (2, 3)]
        resumed = train_loader("dali-cpu", pack600, rank=rank, world_size=2, augment=spec)
        resumed.load_state_dict(state)
        again = [_keys_and_pixels(resumed, e) for e in (2, 3)]
        for (keys, pixels), (keys_again, pixels_again) in zip(rest, again):
            assert keys == keys_again and torch.equal(pixels, pixels_again)


def _keys_and_pixels(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    return flat([b.keys for b in batches]), torch.cat([b.images for b in batches])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("augment", (None, AugmentSpec(degrees=10)))
def test_a_manifest_that_lies_about_frame_sizes_is_a_data_error(tmp_path, kind, augment):
    """48 px frames listed as 16 px: the DALI kinds would skip the resize (and a rotation would
    crop them), so every kind refuses the pack, naming it."""
    pack = make_pack(tmp_path / "pack", 40, 20, size=48)
    manifest = json.loads((pack / MANIFEST).read_text())
    manifest["splits"]["train"]["frame_sizes"] = {f"{SIZE}x{SIZE}": 40}
    (pack / MANIFEST).write_text(json.dumps(manifest))
    loader = train_loader(kind, pack, augment=augment)
    with pytest.raises(DataError, match="48x48") as error:
        list(loader)
    assert error.value.path == pack / MANIFEST


def test_dali_refuses_a_manifest_whose_counts_disagree_with_the_indexes(tmp_path):
    pack = make_pack(tmp_path / "pack", 40, 20)
    manifest = json.loads((pack / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0]["counts"]["va"] = 19
    (pack / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="finds 40") as error:
        list(train_loader("dali-cpu", pack))
    assert error.value.path == pack / MANIFEST


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_reads_the_stored_order_with_a_partial_last_batch(pack600, kind):
    loader = train_loader(kind, pack600, shuffle=False, drop_last=False)
    for epoch in range(2):
        batches = epoch_batches(loader, epoch)
        assert flat(batches) == stored_keys(pack600)
        assert [len(b) for b in batches] == [16] * (600 // 16) + [600 % 16]
