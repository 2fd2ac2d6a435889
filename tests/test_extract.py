"""affectfast extract: a frame checkpoint's trunk features of every frame, as a feature folder.

The one-epoch checkpoint of tests/conftest.py on the pack with a test split: rows against the
shards' index files, features against the trunk run here on the loader's own batches, labels and
masks against the loader, the manifest against the files' bytes; then what must never be left
behind (a failure midway, a full disk) and what is refused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import affectfast.extract as extract_module
from affectfast.cli import main
from affectfast.config import ExtractConfig, TrainConfig
from affectfast.dist import DistInfo
from affectfast.errors import DataError
from affectfast.extract import extract, extract_features, staging_path
from affectfast.features import check_source, load_manifest, load_split
from affectfast.model import AffectNet
from affectfast.predict import image_frames
from affectfast.rundir import load_checkpoint
from affectfast.shards import MANIFEST
from affectfast.shards import load_manifest as load_pack
from affectfast.tasks import TASKS
from affectfast.train import build_eval_loader
from affectfast.tuned import Fingerprint

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
SMALL = dict(loader="dali-cpu", batch_size=24, num_threads=1)  # 24: batches end mid-video
TIMEOUT_S = 240  # a hung torchrun ends here, as a failure


def config(run: Path, shards: Path, out: Path, **kwargs) -> ExtractConfig:
    return ExtractConfig(run / "best.pt", shards, out, **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def features(trained_run, packed_holdout, tmp_path_factory) -> Path:
    """The feature folder of every split of the pack."""
    out = tmp_path_factory.mktemp("features") / "mtl"
    assert extract_features(config(trained_run, packed_holdout, out)) == out
    return out


def trunk_outputs(run: Path, shards: Path, split: str) -> dict[str, tuple]:
    """key -> (float32 features, {task: label}, {task: mask}), computed here: the checkpoint's
    trunk on every batch of a plain eval loader (one process, whole batches of 16)."""
    checkpoint = load_checkpoint(run / "best.pt")
    saved = TrainConfig.from_dict(checkpoint["config"])
    model = AffectNet(saved.tasks)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    reader = TrainConfig(**{**saved.to_dict(), "tasks": TASKS, "task_weights": ()})
    loader = build_eval_loader(reader, shards, split, DistInfo(), 16)
    found = {}
    with torch.no_grad():
        for batch in loader:
            out = model.trunk(batch.images).float().numpy()
            for i, key in enumerate(batch.keys):
                labels = {t: batch.labels[t][i].numpy() for t in TASKS}
                masks = {t: bool(batch.masks[t][i]) for t in TASKS}
                found.setdefault(key, (out[i], labels, masks))
    return found


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- what the folder holds ----------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_rows_are_every_image_of_the_split_in_video_frame_order(features, packed_holdout, split):
    data = load_split(features, split)
    images = image_frames(packed_holdout, split)
    assert [v.name for v in data.videos] == list(images)
    for video in data.videos:
        assert data.frames[video.row_slice].tolist() == images[video.name].tolist()
    assert data.features.shape == (sum(map(len, images.values())), 512)
    assert data.features.dtype == np.float16


def test_each_video_spans_its_annotated_frames_or_ends_at_its_last_image(features, packed_holdout):
    counts = load_pack(packed_holdout).get("frame_counts", {})
    for split in ("train", "val", "test"):
        for video in load_split(features, split).videos:
            last = int(load_split(features, split).frames[video.row_slice][-1])
            assert video.frames == max(counts.get(video.name, last), last)
    assert any(v.name in counts for v in load_split(features, "train").videos)
    assert not any(v.name in counts for v in load_split(features, "test").videos)


@pytest.mark.parametrize("split", ["val", "test"])
def test_features_labels_and_masks_match_the_trunk_run_here(
    features, trained_run, packed_holdout, split
):
    data = load_split(features, split)
    expected = trunk_outputs(trained_run, packed_holdout, split)
    keys = data.keys()
    assert keys == sorted(expected)
    want = np.stack([expected[k][0] for k in keys])
    np.testing.assert_allclose(data.features.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert np.abs(want).max() > 0.1  # real activations, not zeros
    for task in TASKS:
        if task not in data.labels:
            assert not any(expected[k][2][task] for k in keys)  # no label dropped
            continue
        masks = np.array([expected[k][2][task] for k in keys])
        assert (data.masks[task] == masks).all() and masks.any()
        labels = np.stack([expected[k][1][task] for k in keys])
        np.testing.assert_array_equal(data.labels[task][masks], labels[masks])


def test_the_manifest_names_the_checkpoint_and_pack_by_their_bytes(
    features, trained_run, packed_holdout
):
    manifest = load_manifest(features)
    checkpoint = trained_run / "best.pt"
    assert manifest["checkpoint"] == {
        "path": str(checkpoint.absolute()),
        **Fingerprint.of(checkpoint).to_dict(),
    }
    pack_sha = hashlib.sha256((packed_holdout / MANIFEST).read_bytes()).hexdigest()
    assert manifest["pack"]["sha256"] == pack_sha
    assert manifest["frame_tasks"] == list(
        TrainConfig.from_dict(load_checkpoint(checkpoint)["config"]).tasks
    )
    assert (manifest["feature_dim"], manifest["dtype"], manifest["image_size"]) == (
        512,
        "float16",
        48,
    )
    labelled = {s: manifest["splits"][s]["labelled"] for s in ("train", "val", "test")}
    assert labelled == {"train": list(TASKS), "val": list(TASKS), "test": []}
    for split, entry in manifest["splits"].items():
        data = load_split(features, split)
        assert (entry["rows"], entry["videos"]) == (len(data.features), len(data.videos))
    check_source(
        features,
        manifest,
        checkpoint_sha256=Fingerprint.of(checkpoint).sha256,
        pack_sha256=pack_sha,
    )
    with pytest.raises(DataError, match="another frame checkpoint"):
        check_source(features, manifest, checkpoint_sha256="0" * 64)
    assert not [p for p in features.rglob("part-*")]  # the ranks' parts are gone
    assert not staging_path(features).exists()


def test_one_split_and_the_cli_summary(trained_run, packed_holdout, features, tmp_path):
    out = tmp_path / "deep" / "val-only"
    args = ["extract", str(trained_run / "best.pt"), str(packed_holdout), "--out", str(out)]
    args += ["--split", "val", "--loader", "dali-cpu", "--batch-size", "24", "--num-threads", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = load_manifest(features)["splits"]["val"]["rows"]
    assert f"val {rows:,} rows" in result.stdout and "images/s" in result.stdout
    assert list(load_manifest(out)["splits"]) == ["val"]
    # the same bytes as the val split of the all-splits folder
    assert snapshot(out / "val") == snapshot(features / "val")


# --- nothing half-written -----------------------------------------------------------------------


def test_a_failure_midway_leaves_no_folder_and_no_staging(
    trained_run, packed_holdout, tmp_path, monkeypatch
):
    calls = []
    real = extract_module.screen_labels

    def fail_on_second_batch(labels, masks):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine broke")
        return real(labels, masks)

    monkeypatch.setattr(extract_module, "screen_labels", fail_on_second_batch)
    out = tmp_path / "features"
    with pytest.raises(RuntimeError, match="machine broke"):
        extract(config(trained_run, packed_holdout, out))
    assert sorted(os.listdir(tmp_path)) == []  # no OUT, no staging, no lock file


def test_a_full_disk_is_one_line_naming_out_with_nothing_left(
    trained_run, packed_holdout, tmp_path, monkeypatch
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(extract_module.os, "posix_fallocate", full)
    out = tmp_path / "features"
    with pytest.raises(DataError, match=f"{out}: the disk is full"):
        extract(config(trained_run, packed_holdout, out, splits=("val",)))
    assert sorted(os.listdir(tmp_path)) == []


def test_a_killed_extracts_staging_folder_is_removed_by_the_next(
    trained_run, packed_holdout, tmp_path
):
    out = tmp_path / "features"
    leftover = staging_path(out)
    (leftover / "val").mkdir(parents=True)
    (leftover / "val" / "part-0.features.bin").write_bytes(b"\0" * 1024)
    extract(config(trained_run, packed_holdout, out, splits=("val",)))
    assert sorted(os.listdir(tmp_path)) == ["features"]
    assert load_manifest(out)["splits"]["val"]["rows"] > 0


# --- refused ------------------------------------------------------------------------------------


def test_a_non_empty_out_is_refused_and_left_as_it_was(trained_run, packed_holdout, tmp_path):
    out = tmp_path / "features"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=f"{out}: is not empty"):
        extract(config(trained_run, packed_holdout, out, splits=("val",)))
    assert sorted(os.listdir(tmp_path)) == ["features"]
    assert (out / "notes.txt").read_text() == "mine"


def test_a_temporal_checkpoint_is_refused(packed_holdout, tmp_path):
    path = tmp_path / "temporal.pt"
    torch.save({"stage": "temporal", "model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(DataError, match="a temporal checkpoint; extract needs a frame checkpoint"):
        extract(ExtractConfig(path, packed_holdout, tmp_path / "out", **SMALL))
    assert sorted(os.listdir(tmp_path)) == ["temporal.pt"]


def test_a_split_the_pack_lacks_is_refused(trained_run, packed, tmp_path):
    with pytest.raises(DataError, match="no test split in this pack"):
        extract(config(trained_run, packed, tmp_path / "out", splits=("val", "test")))


def test_cli_bad_input_is_one_line_and_exit_code_2(trained_run, packed_holdout, tmp_path):
    out = tmp_path / "features"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["extract", str(trained_run / "best.pt"), str(packed_holdout), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--loader", "dali-cpu"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: is not empty"), lines
    bad = CliRunner().invoke(main, [*args, "--split", "val,holdout"])
    assert bad.exit_code == 2 and "--split" in bad.stderr


# --- several processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Chosen limits, per row: |GPU - CPU| / |CPU| of the features. The CUDA trunk runs under the
# checkpoint's autocast (bf16 on a recent GPU: ~1 % per row); dali-gpu decodes with nvJPEG, whose
# pixels differ from libjpeg-turbo's by a level or two.
CUDA_FEATURE_ERROR = {"dali-cpu": 0.05, "dali-gpu": 0.15}


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["dali-cpu", "dali-gpu"])
def test_extract_on_cuda_gives_the_cpu_trunks_features_row_for_row(
    trained_run, packed_holdout, tmp_path, loader
):
    out = extract_features(
        config(trained_run, packed_holdout, tmp_path / "features", splits=("val",), loader=loader)
    )
    data = load_split(out, "val")
    expected = trunk_outputs(trained_run, packed_holdout, "val")  # on the CPU
    keys = data.keys()
    assert keys == sorted(expected)
    got = data.features.astype(np.float32)
    want = np.stack([expected[k][0] for k in keys])
    error = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert error.max() < CUDA_FEATURE_ERROR[loader], (error.max(), keys[int(error.argmax())])
    for task in data.labels:
        masks = np.array([expected[k][2][task] for k in keys])
        assert (data.masks[task] == masks).all()


@pytest.mark.slow
def test_two_processes_write_the_folder_one_process_writes(
    trained_run, packed_holdout, features, tmp_path
):
    """Two ranks (gloo on the CPU), each writing its part, rank 0 merging: byte for byte the
    one-process folder's splits (val and test, the smallest). Slow: ~30 s on 2 shared cores,
    mostly two interpreters starting torch and DALI."""
    out = tmp_path / "features"
    port = free_port()
    command = [sys.executable, "-m", "affectfast", "extract", str(trained_run / "best.pt")]
    command += [str(packed_holdout), "--out", str(out), "--loader", "dali-cpu"]
    command += ["--batch-size", "24", "--num-threads", "1", "--split", "val,test"]
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            **dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2"),
            **dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
        }
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        results = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in processes] == [0, 0], [e[-1500:] for _, e in results]
    assert "images/s" in results[0][0] and results[1][0] == ""  # rank 0 reports
    for split in ("val", "test"):
        assert snapshot(out / split) == snapshot(features / split)
    manifest, alone = load_manifest(out), load_manifest(features)
    assert manifest["splits"] == {s: alone["splits"][s] for s in ("val", "test")}
    assert {**manifest, "splits": None} == {**alone, "splits": None}


def test_the_wds_loader_gives_the_same_rows_and_labels(
    trained_run, packed_holdout, features, tmp_path
):
    out = tmp_path / "wds"
    extract(config(trained_run, packed_holdout, out, splits=("val",), loader="wds"))
    mine, alone = load_split(out, "val"), load_split(features, "val")
    assert mine.videos == alone.videos and (mine.frames == alone.frames).all()
    for task in alone.labels:
        assert (mine.masks[task] == alone.masks[task]).all()
        assert (mine.labels[task] == alone.labels[task]).all()
    # another JPEG decoder and resize: close, not equal
    gap = np.abs(mine.features.astype(np.float32) - alone.features.astype(np.float32)).mean()
    assert gap < 0.05 * np.abs(alone.features.astype(np.float32)).mean(), gap


def test_extract_config_is_validated():
    with pytest.raises(ValueError, match="splits must be distinct"):
        ExtractConfig("a.pt", "shards", "out", splits=("val", "val"))
    with pytest.raises(ValueError, match="loader must be one of"):
        ExtractConfig("a.pt", "shards", "out", loader="files")
    assert ExtractConfig("a.pt", "shards", "out", splits="test").splits == ("test",)
