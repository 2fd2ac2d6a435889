"""Shared fixtures: a small synthetic Aff-Wild2 tree and its packed shards (session-scoped, built once)."""

from __future__ import annotations

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
