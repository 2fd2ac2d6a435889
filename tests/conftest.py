"""Shared fixtures: a small synthetic Aff-Wild2 tree and its packed shards (session-scoped, built once)."""

from __future__ import annotations

import dataclasses

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
