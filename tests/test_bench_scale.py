"""benchmarks/bench_scale.py: the hard-link tree is a valid Aff-Wild2 tree of the asked size and
shape, the disk check refuses, and (slow) a whole tiny run measures what it claims."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from affectfast.affwild2 import find_annotation_dirs, read_tree
from affectfast.constants import LABELLED_SPLITS
from affectfast.tasks import TASKS

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_parse_sizes(bench):
    assert bench.parse_sizes("2.8M, 28k,280000,28000") == (28_000, 280_000, 2_800_000)


def test_tree_is_a_valid_affwild2_tree_of_hard_links(bench, tmp_path):
    pool = tmp_path / "pool"
    names = bench.make_pool(pool, 16, seed=0)
    videos = bench.plan_videos(3_000, seed=0)
    root = tmp_path / "tree"
    images = bench.build_tree(root, videos, pool, names, seed=0)

    assert abs(images - 3_000) < 150  # about GAP_FRACTION of the lines have no image
    assert sum(v.lines for v in videos) > images
    assert {v.split for v in videos} == set(LABELLED_SPLITS)
    for task in TASKS:  # every task in both splits; VA on (almost) every video
        assert {v.split for v in videos if task in v.tasks} == set(LABELLED_SPLITS)
    assert sum("va" in v.tasks for v in videos) > sum("expr" in v.tasks for v in videos)
    assert any(v.name.endswith("_left") for v in videos)

    read = read_tree(find_annotation_dirs(root))  # headers, values, no leakage
    assert {v.name for v in read} == {v.name for v in videos}
    assert 0.9 * images < sum(len(v) for v in read) <= images

    frame = next((root / "cropped_aligned" / videos[0].name).iterdir())
    pool_inodes = {(pool / n).stat().st_ino for n in names}
    assert frame.stat().st_ino in pool_inodes and frame.stat().st_nlink > 1
    assert 4_000 < os.path.getsize(frame) < 7_000  # about the real crops' 5.4 KB


def test_refuses_without_disk_space(bench, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    code = bench.main(["--frames", "28k", "--work", str(tmp_path / "work")])
    assert code == 2
    assert "needs about 0.25 GB" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_tiny_run_measures_every_stage(bench, tmp_path):
    out = tmp_path / "scale.csv"
    args = ["--frames", "2000", "--work", str(tmp_path / "work"), "--csv", str(out)]
    args += ["--loaders", "dali-cpu,files", "--seconds", "0.5", "--boundaries", "1"]
    args += ["--batch-size", "64", "--pool", "32", "--full-epoch"]
    assert bench.main(args) == 0

    with open(out) as f:
        rows = {(r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}
    assert rows[("full epoch dali-cpu", "each exactly once")] == 1
    assert rows[("full epoch dali-cpu", "train samples seen")] == rows[("shards", "train samples")]
    for stage in ("pack --check header", "pack --check full", "verify"):
        assert rows[(stage, "wall")] > 0 and rows[(stage, "peak PSS all processes")] > 0
    assert rows[("dali-cpu", "steady")] > 0 and rows[("files", "steady")] > 0
    # DALI's boundary is measured at the end of its whole epoch; files sets up every epoch anew.
    assert rows[("full epoch dali-cpu", "epoch boundary (last batch to next first)")] > 0
    assert rows[("files", "epoch boundary")] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert not (tmp_path / "work" / "tree-2000").exists()  # removed without --keep
