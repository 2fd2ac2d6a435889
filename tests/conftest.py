"""Shared fixtures: a small synthetic Aff-Wild2 tree and its packed shards (session-scoped, built once)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests cleanly where CUDA is absent (never fake them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: the DALI/DataLoader threads need the other
    yield
    torch.set_num_threads(previous)


one_thread = pytest.fixture(_one_torch_thread)
one_thread_per_module = pytest.fixture(
    _one_torch_thread, scope="module", name="one_thread_per_module"
)


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory):
    """A small synthetic Aff-Wild2-layout tree."""
    from affectfast.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("tree")
    return synthesize(SynthConfig(out=root, videos=8, frames=40, seed=0, image_size=64, workers=1))


@pytest.fixture(scope="session")
def packed(tmp_path_factory, synth_tree):
    """The synthetic tree packed into shards."""
    from affectfast.pack import PackConfig, pack

    out = tmp_path_factory.mktemp("shards")
    pack(PackConfig(root=synth_tree, out=out, workers=1, shard_size=64, seed=0))
    return out


@pytest.fixture(scope="session")
def holdout_tree(tmp_path_factory):
    """The tree of ``synth_tree`` (the same train and val bytes) with 3 more videos held out as an
    ABAW test set: frames, no annotation file, one list per challenge under test_lists/."""
    from affectfast.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("tree-holdout")
    config = SynthConfig(out=root, videos=8, frames=40, seed=0, image_size=64, workers=1)
    return synthesize(dataclasses.replace(config, test_videos=3))


@pytest.fixture(scope="session")
def holdout_lists(holdout_tree):
    """(task, list file) of each challenge's test list in ``holdout_tree``."""
    from affectfast.synth import TEST_LISTS, TEST_LISTS_DIR

    return tuple((t, holdout_tree / TEST_LISTS_DIR / name) for t, name in TEST_LISTS.items())


@pytest.fixture(scope="session")
def packed_holdout(tmp_path_factory, holdout_tree, holdout_lists):
    """``holdout_tree`` packed with its test lists: train, val and the image-only test split."""
    from affectfast.pack import PackConfig, pack

    out = tmp_path_factory.mktemp("shards-holdout")
    config = PackConfig(holdout_tree, out, workers=1, shard_size=64, test_lists=holdout_lists)
    pack(config, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(packed_holdout, tmp_path_factory):
    """A one-epoch multi-task run folder (best.pt, last.pt) on ``packed_holdout``, on the CPU:
    for evaluate and predict, where the files' format matters, not the scores. Tests that tune
    (and so write beside best.pt) work on a copy of best.pt."""
    from affectfast.config import TrainConfig
    from affectfast.train import train

    out = tmp_path_factory.mktemp("runs") / "mtl"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(shards=packed_holdout, out=out, epochs=1, **TINY_RUN))
    finally:
        torch.set_num_threads(previous)
    return out


# Settings of the tiny CPU runs tests train.
TINY_RUN = dict(
    loader="dali-cpu", batch_size=32, image_size=48, num_threads=1, amp="off", device="cpu"
)


def write_manifest(folder: Path, split: str = "train") -> Path:
    """A format_version 2 manifest for hand-made ``<split>-*.tar`` + ``.idx`` files in ``folder``
    (counts, bytes, frame sizes and label statistics read from the tars), for tests that build
    shards by hand."""
    import numpy as np

    from affectfast.jpeg import check_jpeg
    from affectfast.shards import FORMAT_VERSION, MANIFEST, size_text
    from affectfast.tasks import LABEL_EXT, NUM_AU, NUM_EXPR, TASKS, decode_label

    shards, sizes, videos = [], {}, set()
    labels = {task: [] for task in TASKS}
    for tar_path in sorted(Path(folder).glob(f"{split}-*.tar")):
        data = tar_path.read_bytes()
        counts, jpeg_bytes, keys = dict.fromkeys(TASKS, 0), 0, set()
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                keys.add(key)
                videos.add(key.split("/")[0])
                payload = tar.extractfile(member).read()
                if ext == "jpg":
                    jpeg_bytes += member.size
                    text = size_text(*check_jpeg(payload, "header"))
                    sizes[text] = sizes.get(text, 0) + 1
                for task in TASKS:
                    if ext == LABEL_EXT[task]:
                        counts[task] += 1
                        labels[task].append(decode_label(task, payload))
        shards.append(
            {
                "name": tar_path.name,
                "index": tar_path.with_suffix(".idx").name,
                "samples": len(keys),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "counts": counts,
                "jpeg_bytes": jpeg_bytes,
            }
        )
    va = np.array(labels["va"], dtype=np.float64).reshape(-1, 2)
    expr = np.array(labels["expr"], dtype=np.int64).reshape(-1)
    au = np.array(labels["au"], dtype=np.int64).reshape(-1, NUM_AU)
    stats = {
        "va": {
            "valid": len(va),
            "mean": va.mean(axis=0).tolist() if len(va) else [0.0, 0.0],
            "std": va.std(axis=0).tolist() if len(va) else [0.0, 0.0],
        },
        "expr": {
            "valid": len(expr),
            "class_counts": np.bincount(expr, minlength=NUM_EXPR).tolist(),
        },
        "au": {"valid": len(au), "positive_counts": (au == 1).sum(axis=0).tolist()},
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "splits": {
            split: {
                "samples": sum(s["samples"] for s in shards),
                "videos": len(videos),
                "shards": shards,
                "frame_sizes": sizes,
                "stats": stats,
                "bad_files": [],
            }
        },
    }
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder
