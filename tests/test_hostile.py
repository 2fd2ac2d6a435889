"""Hostile input: keys that escape or collapse, damaged shards, errors raised in loader workers.

Every case is built from real bytes (tars written with ``affectfast.shards``' own encoders, files
damaged in place) and must end in a DataError naming the file, never a wrong epoch or a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from affectfast.errors import DataError
from affectfast.jpeg import check_jpeg
from affectfast.loaders import build_loader
from affectfast.loaders.dali import _decode_keys
from affectfast.shards import (
    MANIFEST,
    check_key,
    index_line,
    index_text,
    load_manifest,
    tar_end,
    tar_member,
)
from affectfast.tasks import TASKS, encode_label
from affectfast.verify import verify

SHARD_KINDS = ("dali-cpu", "wds")
CPU_KINDS = ("dali-cpu", "wds", "files")


def first_jpeg(packed: Path) -> bytes:
    with tarfile.open(packed / "val-000000.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return tar.extractfile(member).read()


def write_split(folder: Path, split: str, tar_keys: list[str], idx_keys: list[str], jpeg: bytes):
    """One shard of ``split`` whose tar members are named by ``tar_keys`` and whose .idx (and the
    manifest's shard list) by ``idx_keys``, same offsets: a hostile or inconsistent shard."""
    blob, lines = b"", []
    for tar_key, idx_key in zip(tar_keys, idx_keys):
        components = []
        for ext, payload in (
            ("jpg", jpeg),
            ("va", encode_label("va", [0.25, -0.5])),
            ("expr", encode_label("expr", 3)),
            ("au", encode_label("au", [0, 1] * 6)),
        ):
            components.append((f"{idx_key}.{ext}", len(blob) + tarfile.BLOCKSIZE, len(payload)))
            blob += tar_member(f"{tar_key}.{ext}", payload)
        lines.append(index_line(components))
    blob += tar_end(len(blob))
    for old in folder.glob(f"{split}-*"):
        old.unlink()
    (folder / f"{split}-000000.tar").write_bytes(blob)
    (folder / f"{split}-000000.idx").write_text(index_text(lines))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["splits"][split]["shards"] = [
        {
            "name": f"{split}-000000.tar",
            "index": f"{split}-000000.idx",
            "samples": len(lines),
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "counts": {task: len(lines) for task in TASKS},
            "jpeg_bytes": len(jpeg) * len(lines),
        }
    ]
    height, width = check_jpeg(jpeg, "header")
    manifest["splits"][split]["frame_sizes"] = {f"{height}x{width}": len(lines)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def shards_copy(packed, tmp_path):
    return Path(shutil.copytree(packed, tmp_path / "shards"))


def load_all(kind, shards, split="val", tasks=TASKS, tree=None, **kw):
    kw = {"image_size": 64, "with_keys": True, "num_threads": 1, **kw}
    return [b for b in build_loader(kind, shards, split, tasks, 4, tree=tree, **kw)]


# --- one key rule -------------------------------------------------------------------------------


def test_the_key_rule():
    assert check_key("v/00001") and check_key("10-60-1280x720_left/12345")
    for key in ("../x/00001", "/abs/00001", "a:b/00001", "a.b/00001", "a b/00001", "v/0001"):
        assert not check_key(key), key
    assert check_key("x" * 88 + "/00001") and not check_key("x" * 89 + "/00001")


@pytest.mark.parametrize("bad", ["../evil/00002", "/abs/00002", "a:b/00002"])
def test_every_kind_and_verify_refuse_a_shard_with_keys_that_escape_or_collapse(
    shards_copy, packed, bad
):
    keys = ["v/00001", bad, "b/00002"]  # "a:b/00002" would collapse into "b/00002" in DALI
    write_split(shards_copy, "val", keys, keys, first_jpeg(packed))
    idx, tar = shards_copy / "val-000000.idx", shards_copy / "val-000000.tar"
    for kind in SHARD_KINDS:  # met where the loader reads it: the shard is named
        with pytest.raises(DataError, match="not .*a sample") as info:
            load_all(kind, shards_copy)
        assert info.value.path in (idx, tar, shards_copy), kind  # DALI: the source names it
    # A bad first key is refused when a loader starts, naming the index and its line.
    write_split(shards_copy, "val", [bad, "v/00001"], [bad, "v/00001"], first_jpeg(packed))
    for kind in SHARD_KINDS:
        with pytest.raises(DataError, match="is not a sample's") as info:
            build_loader(kind, shards_copy, "val", TASKS, 4)
        assert (info.value.path, info.value.line) == (idx, 2), kind
    problems = verify(shards_copy)
    assert any(f"member '{bad}.jpg' is not a sample's" in p for p in problems), problems


def test_the_files_kind_and_pack_refuse_a_video_name_with_a_colon(synth_tree, tmp_path):
    from affectfast.pack import PackConfig, pack

    tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
    video = next(p for p in (tree / "cropped_aligned").iterdir())
    for annotation in tree.rglob(f"{video.name}.txt"):
        annotation.rename(annotation.with_name(f"a:{video.name}.txt"))
    video.rename(video.with_name(f"a:{video.name}"))
    with pytest.raises(DataError, match="cannot be packed") as info:
        pack(PackConfig(root=tree, out=tmp_path / "out", workers=1))
    assert f"a:{video.name}" in str(info.value)
    with pytest.raises(DataError, match="cannot be packed"):
        load_all("files", tmp_path / "out", tree=tree)  # the tree is read before the shards


def test_wds_refuses_a_tar_member_its_index_does_not_name(shards_copy, packed):
    # The first sample agrees (the index matches its tar); the second's tar header says "a:b".
    tar_keys, idx_keys = ["v/00001", "a:b/00002"], ["v/00001", "v/00002"]
    write_split(shards_copy, "val", tar_keys, idx_keys, first_jpeg(packed))
    with pytest.raises(DataError, match="'a:b/00002' is not a sample's") as info:
        load_all("wds", shards_copy)
    assert info.value.path == shards_copy / "val-000000.tar"
    assert any("member 'a:b/00002.jpg' is not a sample's" in p for p in verify(shards_copy))


def test_dali_keys_are_cut_from_the_right_and_checked():
    def info(text: str) -> torch.Tensor:
        rows = [list(t.encode()) for t in text.split("|")]
        width = max(map(len, rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.uint8)

    tars = {"/data/x:y/val-000000.tar"}  # a tar path may hold ':'
    assert _decode_keys(info("/data/x:y/val-000000.tar:1536:v/00001.jpg"), tars) == ["v/00001"]
    for member in ("a:b/00001.jpg", "../v/00001.jpg"):
        with pytest.raises(DataError, match="does not name a sample"):
            _decode_keys(info(f"/data/x:y/val-000000.tar:1536:{member}"), tars)


# --- damaged shards met by a loader ---------------------------------------------------------------


def damage_member(tar: Path, index: int, how: str) -> str:
    """Damage member ``index`` of ``tar`` (image ``index`` for "jpeg") in place, keeping its size;
    return the member's name."""
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as f:
        members = [m for m in f if how != "jpeg" or m.name.endswith(".jpg")]
    member = members[index]
    if how == "jpeg":  # keep the start marker, zero the rest: a corrupt image
        start = member.offset_data + 200
        data[start : member.offset_data + member.size] = bytes(member.size - 200)
    elif how == "checksum":  # tarfile then ends the archive there, silently
        data[member.offset + 148 : member.offset + 156] = b"0000000\0"
    elif how == "size":  # the member swallows the next ones
        data[member.offset + 124 : member.offset + 136] = b"%011o\0" % (member.size + 2048)
    tar.write_bytes(bytes(data))
    return member.name


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_a_corrupt_jpeg_is_a_data_error_naming_where_it_is(shards_copy, synth_tree, tmp_path, kind):
    tar = shards_copy / "val-000000.tar"
    name = damage_member(tar, 5, "jpeg")
    tree = synth_tree
    if kind == "files":
        tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
        image = tree / "cropped_aligned" / name
        data = bytearray(image.read_bytes())
        data[200:] = bytes(len(data) - 200)
        image.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        load_all(kind, shards_copy, tree=tree)
    expected = {"dali-cpu": shards_copy, "wds": tar, "files": tree / "cropped_aligned" / name}
    assert info.value.path == expected[kind]
    if kind == "dali-cpu":  # DALI's message names no file: the shards and the way to find it
        assert "val-000000.tar" in str(info.value) and "--decode" in str(info.value)
    if kind == "wds":
        assert name in str(info.value)


@pytest.mark.parametrize("how", ["checksum", "size"])
def test_wds_never_yields_a_short_epoch_from_a_damaged_tar_header(shards_copy, packed, how):
    damage_member(shards_copy / "val-000000.tar", 21, how)
    with pytest.raises(DataError) as info:
        load_all("wds", shards_copy)
    assert info.value.path == shards_copy / "val-000000.tar"
    # DALI reads by the index's offsets, which still point at intact data: the same epoch.
    keys = [k for b in load_all("dali-cpu", shards_copy) for k in b.keys]
    assert len(keys) == load_manifest(packed)["splits"]["val"]["samples"]


def test_swapped_index_files_are_refused_by_every_kind(shards_copy):
    a, b = shards_copy / "train-000000.idx", shards_copy / "train-000001.idx"
    first, second = a.read_text(), b.read_text()
    a.write_text(second)
    b.write_text(first)
    for kind in SHARD_KINDS:
        with pytest.raises(DataError, match="swapped or stale index") as info:
            load_all(kind, shards_copy, split="train")
        assert info.value.path == a, kind
    assert np.any(["does not match its tar" in p for p in verify(shards_copy)])


# --- non-finite settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=float("inf")),
        dict(lr=float("nan")),
        dict(weight_decay=float("nan")),
        dict(weight_decay=float("inf")),
        dict(task_weights={"va": float("inf")}),
        dict(task_weights={"va": float("nan")}),
        dict(rotate_degrees=181.0),
        dict(rotate_degrees=float("nan")),
        dict(seed=2**31),
        dict(seed=-1),
    ],
)
def test_train_config_refuses_non_finite_and_out_of_range_numbers(tmp_path, bad):
    from affectfast.config import TrainConfig

    with pytest.raises(ValueError):
        TrainConfig(shards=tmp_path, out=tmp_path / "r", tasks="va", **bad)


@pytest.mark.parametrize(
    "option",
    [
        ["--lr", "inf"],
        ["--lr", "nan"],
        ["--weight-decay", "nan"],
        ["--task-weights", "va=inf"],
        ["--rotate-degrees", "270"],
        ["--seed", str(2**31)],
    ],
)
def test_cli_refuses_non_finite_numbers_before_training(packed, tmp_path, option):
    from click.testing import CliRunner

    from affectfast.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(packed), "--out", str(out), *option])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert not out.exists()


# --- labels out of range and a diverging run ------------------------------------------------------

# device="cpu": the CPU tier trains on the CPU even on a GPU node (its asserts are exact).
SMALL = dict(
    loader="dali-cpu", batch_size=32, image_size=48, num_threads=1, amp="off", device="cpu"
)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def one_good_epoch(packed: Path, tmp_path: Path):
    """A two-epoch run on a copy of the shards, stopped after its first epoch, and its files."""
    from affectfast.config import TrainConfig
    from affectfast.train import train

    shards = Path(shutil.copytree(packed, tmp_path / "shards"))
    config = TrainConfig(shards=shards, out=tmp_path / "run", epochs=2, **SMALL)
    train(config, stop_after=1)
    return config, {name: (config.out / name).read_bytes() for name in RUN_FILES}


def set_label(tar: Path, ext: str, payload: bytes, nth: int = 3) -> str:
    """Overwrite the ``nth`` ``.ext`` member's bytes in place (same size); return its name."""
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as f:
        member = [m for m in f if m.name.endswith(f".{ext}")][nth]
    assert member.size == len(payload)
    data[member.offset_data : member.offset_data + member.size] = payload
    tar.write_bytes(bytes(data))
    return member.name


@pytest.mark.parametrize(
    "ext,payload",
    [("va", np.array([np.nan, 0.5], "<f4").tobytes()), ("expr", bytes([200]))],
)
def test_a_label_out_of_range_stops_training_naming_it_and_keeps_the_last_good_epoch(
    packed, tmp_path, one_thread, ext, payload
):
    from affectfast.train import train

    config, before = one_good_epoch(packed, tmp_path)
    tar = config.shards / "train-000001.tar"
    member = set_label(tar, ext, payload)
    with pytest.raises(DataError, match="out of range") as info:
        train(config, resume=True)
    assert info.value.path == tar and member in str(info.value)
    assert "last.pt and best.pt still hold epoch 1" in str(info.value)
    assert {name: (config.out / name).read_bytes() for name in RUN_FILES} == before


@pytest.mark.parametrize("kind", SHARD_KINDS)
def test_every_shard_kind_screens_out_a_nan_label_without_a_host_sync(shards_copy, kind):
    from affectfast.loaders import screen_labels

    good = [bool(screen_labels(b.labels, b.masks)) for b in load_all(kind, shards_copy)]
    assert not any(good)
    tar = shards_copy / "val-000000.tar"
    member = set_label(tar, "va", np.array([0.1, np.inf], "<f4").tobytes())
    batches = load_all(kind, shards_copy)
    flags = [screen_labels(b.labels, b.masks) for b in batches]
    assert all(f.shape == () and f.dtype == torch.bool for f in flags)
    assert sum(map(bool, flags)) == 1
    (batch,) = [b for b, f in zip(batches, flags) if f]
    row = batch.keys.index(member.removesuffix(".va"))
    assert not batch.masks["va"][row] and torch.isfinite(batch.labels["va"]).all()


def test_evaluating_a_split_with_a_label_out_of_range_names_it(packed, tmp_path, one_thread):
    from affectfast.config import EvalConfig
    from affectfast.predict import evaluate

    config, _ = one_good_epoch(packed, tmp_path)
    tar = config.shards / "val-000000.tar"
    member = set_label(tar, "au", bytes([1, 0, 7] + [0] * 9))
    with pytest.raises(DataError, match="out of range") as info:
        evaluate(
            EvalConfig(config.out / "last.pt", config.shards, loader="dali-cpu", num_threads=1)
        )
    assert info.value.path == tar and member in str(info.value)


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(packed, tmp_path, one_thread):
    from click.testing import CliRunner

    from affectfast.cli import main

    out = tmp_path / "run"
    options = [
        "--loader",
        "dali-cpu",
        "--batch-size",
        "32",
        "--image-size",
        "32",
        "--device",
        "cpu",
    ]
    options += ["--num-threads", "1", "--amp", "off", "--epochs", "1", "--lr", "1e30"]
    result = CliRunner().invoke(main, ["train", str(packed), "--out", str(out), *options])
    assert result.exit_code == 2, result.output
    assert "training diverged" in result.output and "Traceback" not in result.output
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()


def test_a_non_finite_loss_after_a_good_epoch_keeps_its_checkpoints(
    packed, tmp_path, one_thread, monkeypatch
):
    import affectfast.train
    from affectfast.train import train

    config, before = one_good_epoch(packed, tmp_path)
    monkeypatch.setattr(affectfast.train, "train_step", lambda *a, **k: torch.tensor(np.inf))
    with pytest.raises(DataError, match="epoch 2: the train loss is inf"):
        train(config, resume=True)
    assert {name: (config.out / name).read_bytes() for name in RUN_FILES} == before


# --- run folders: what a run claims is what it measured -------------------------------------------


def test_a_fresh_run_never_appends_to_another_runs_files(packed, tmp_path):
    from affectfast.config import TrainConfig
    from affectfast.train import train

    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.jsonl", "config.json"):
        (out / name).write_text('{"epoch": 1, "p_mtl": 2.5}\n')
        with pytest.raises(DataError, match="already holds a run") as info:
            train(TrainConfig(shards=packed, out=out, epochs=1, **SMALL))
        assert info.value.path == out / name
        assert (out / name).read_text() == '{"epoch": 1, "p_mtl": 2.5}\n'
        (out / name).unlink()
    with pytest.raises(DataError, match="checkpoint not found"):
        train(TrainConfig(shards=packed, out=out, epochs=1, **SMALL), resume=True)


def test_resume_takes_shards_spelled_otherwise_and_a_moved_run_folder(
    packed, tmp_path, one_thread, monkeypatch
):
    from affectfast.config import TrainConfig
    from affectfast.rundir import load_checkpoint
    from affectfast.train import train

    train(TrainConfig(shards=packed, out=tmp_path / "a", epochs=2, **SMALL), stop_after=1)
    (tmp_path / "a").rename(tmp_path / "b")
    monkeypatch.chdir(packed.parent)
    relative = TrainConfig(shards=Path(packed.name), out=tmp_path / "b", epochs=2, **SMALL)
    assert [r["epoch"] for r in train(relative, resume=True)] == [2]
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    other = TrainConfig(shards=tmp_path / "b", out=tmp_path / "b", epochs=2, **SMALL)
    with pytest.raises(DataError, match="shards changed") as info:
        train(other, resume=True)
    assert info.value.path == tmp_path / "b" / "config.json"


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(
    packed, tmp_path, one_thread, monkeypatch
):
    import affectfast.train
    from affectfast.config import TrainConfig
    from affectfast.train import train

    config = TrainConfig(shards=packed, out=tmp_path / "run", epochs=1, **SMALL)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(affectfast.train, "train_one_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            train(config)
    assert (config.out / "config.json").is_file() and not (config.out / "last.pt").exists()
    with pytest.raises(DataError, match="already holds a run"):
        train(config)
    assert [r["epoch"] for r in train(config, resume=True)] == [1]


def test_a_study_rerun_with_other_settings_is_refused_not_skipped(
    packed, tmp_path, one_thread, monkeypatch
):
    import dataclasses

    from affectfast.config import TrainConfig
    from affectfast.study import StudyConfig, run_study

    base = TrainConfig(
        shards=packed, out=tmp_path / "study", epochs=1, **{**SMALL, "image_size": 32}
    )
    study = StudyConfig(out=tmp_path / "study", base=base, inits=("scratch",))
    rows = run_study(study)
    results = (tmp_path / "study" / "results.md").read_text()
    monkeypatch.chdir(packed.parent)  # the same shards, spelled relative: still the same study
    relative = dataclasses.replace(base, shards=Path(packed.name))
    assert run_study(dataclasses.replace(study, base=relative)) == rows
    for change in (dict(lr=1e-4), dict(image_size=48), dict(augment=False)):
        other = dataclasses.replace(study, base=dataclasses.replace(base, **change))
        with pytest.raises(DataError, match=f"{next(iter(change))} changed") as info:
            run_study(other)
        assert info.value.path == tmp_path / "study" / "scratch" / "uni-va" / "config.json"
    assert (tmp_path / "study" / "results.md").read_text() == results


def test_a_task_without_val_labels_is_reported_absent_not_zero(synth_tree, tmp_path, one_thread):
    from affectfast.config import TrainConfig
    from affectfast.metrics import format_tables
    from affectfast.pack import PackConfig, pack
    from affectfast.rundir import read_metrics
    from affectfast.study import StudyRun, format_table, result_row
    from affectfast.train import train

    tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
    for annotation in tree.rglob("VA_Estimation_Challenge/Validation_Set/*.txt"):
        header, *frames = annotation.read_text().splitlines()
        annotation.write_text("\n".join([header, *["-5,-5"] * len(frames)]) + "\n")  # all ignored
    pack(PackConfig(root=tree, out=tmp_path / "shards", workers=1, shard_size=64), progress=False)
    config = TrainConfig(shards=tmp_path / "shards", out=tmp_path / "run", epochs=1, **SMALL)
    (record,) = train(config)
    (logged,) = read_metrics(config.out / "metrics.jsonl")
    assert logged == record
    for key in ("ccc_valence", "ccc_arousal", "ccc_mean"):
        assert key in logged and logged[key] is None, key
    assert logged["frames_va"] == 0
    assert logged["p_mtl"] == pytest.approx(logged["f1_expr"] + logged["f1_au"])
    assert "ccc_mean" in format_tables(logged) and "absent" in format_tables(logged)
    row = result_row(StudyRun("multi", "scratch", TASKS, "scratch", config.out), [logged])
    assert row["ccc_valence"] == row["ccc_arousal"] == "absent"
    assert "| multi | scratch | 1/1 | absent | absent |" in format_table([row])


def test_the_files_kind_refuses_a_tree_the_shards_were_not_packed_from(
    packed, synth_tree, tmp_path
):
    tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
    assert len(load_all("files", packed, tree=tree)) > 0  # a copy elsewhere is the same source
    annotation = next(tree.rglob("EXPR_Recognition_Challenge/Train_Set/*.txt"))
    lines = annotation.read_text().splitlines()
    lines[1] = "7" if lines[1] != "7" else "6"  # one label changed
    annotation.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="is not the tree") as info:
        load_all("files", packed, tree=tree)
    assert info.value.path == tree


# --- the manifest is checked, and it is the list ------------------------------------------------


@pytest.mark.parametrize(
    "task,key,value",
    [
        ("expr", "class_counts", [-5, 10, 0, 0, 0, 0, 0, 0]),
        ("expr", "class_counts", [1, 2, 3]),
        ("expr", "class_counts", [1.5, 0, 0, 0, 0, 0, 0, 0]),
        ("au", "positive_counts", [10**9] * 12),
        ("au", "valid", -1),
        ("va", "std", [float("nan"), 0.2]),
        ("va", "mean", [float("inf"), 0.0]),
    ],
)
def test_insane_manifest_statistics_are_refused_naming_the_manifest(shards_copy, task, key, value):
    from affectfast.config import TrainConfig
    from affectfast.train import train

    path = shards_copy / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["stats"][task][key] = value
    path.write_text(json.dumps(manifest))  # NaN and Infinity as Python's json writes them
    with pytest.raises(DataError, match=f"stats.{task} is not sane") as info:
        train(TrainConfig(shards=shards_copy, out=shards_copy / "run", epochs=1, **SMALL))
    assert info.value.path == path
    assert not (shards_copy / "run" / "last.pt").exists()


def test_a_manifest_listing_no_shards_for_a_split_never_falls_back_to_stray_tars(shards_copy):
    path = shards_copy / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["splits"]["val"]["shards"] = []
    path.write_text(json.dumps(manifest))
    for kind in SHARD_KINDS:  # the val tars are still there, but not the manifest's
        with pytest.raises(DataError, match="lists no val shards") as info:
            load_all(kind, shards_copy)
        assert info.value.path == path


# --- no raw tracebacks: checkpoints, full disks, unwritable and unreadable paths ------------------


def cli(*args: str):
    """Run the affectfast CLI in-process; (exit code, stdout + stderr)."""
    from click.testing import CliRunner

    from affectfast.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_exit_2(code: int, output: str, *expected: str) -> None:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, output
    assert "Traceback" not in output and "weights_only" not in output, output
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_checkpoints_without_what_they_need_are_one_line_errors(packed, tmp_path, one_thread):
    from affectfast.model import build_model

    config, _ = one_good_epoch(packed, tmp_path)
    checkpoint = torch.load(config.out / "last.pt", weights_only=True)
    broken = {
        "no-model.pt": {k: v for k, v in checkpoint.items() if k != "model"},
        "other-model.pt": {**checkpoint, "model": build_model(("va",)).state_dict()},
        "bad-config.pt": {**checkpoint, "config": {**checkpoint["config"], "tasks": ["xx"]}},
        "no-optimizer.pt": {k: v for k, v in checkpoint.items() if k != "optimizer"},
    }
    for name, value in broken.items():
        torch.save(value, tmp_path / name)
    (tmp_path / "page.pt").write_text("<html>404 not found</html>")
    (tmp_path / "cut.pt").write_bytes((config.out / "last.pt").read_bytes()[:4096])
    evaluate = ["evaluate", "--loader", "dali-cpu", "--num-threads", "1"]
    for name, expected in [
        ("no-model.pt", "no model"),
        ("other-model.pt", "do not fit its config"),
        ("bad-config.pt", "its config is not a run's"),
        ("page.pt", "saved with torch.save"),
        ("cut.pt", "damaged torch.save file"),
    ]:
        code, output = cli(*evaluate[:1], tmp_path / name, config.shards, *evaluate[1:])
        assert_one_line_exit_2(code, output, str(tmp_path / name), expected)
    (config.out / "last.pt").write_bytes((tmp_path / "no-optimizer.pt").read_bytes())
    options = ["--loader", "dali-cpu", "--batch-size", "32", "--image-size", "48"]
    options += ["--num-threads", "1", "--amp", "off", "--epochs", "2", "--lr", "0.001"]
    options += ["--device", "cpu"]
    code, output = cli("train", config.shards, "--out", config.out, *options, "--resume")
    assert_one_line_exit_2(code, output, "last.pt", "no optimizer")
    for init in ("ckpt", "imagenet"):
        out = tmp_path / f"init-{init}"
        code, output = cli(
            "train",
            config.shards,
            "--out",
            out,
            "--init",
            f"{init}:{tmp_path}/page.pt",
            "--device",
            "cpu",
        )
        assert_one_line_exit_2(code, output, "page.pt", "saved with torch.save")
        assert not (out / "last.pt").exists()


def test_a_full_disk_while_saving_leaves_no_temporary_and_keeps_the_last_checkpoint(
    packed, tmp_path, one_thread, monkeypatch
):
    from affectfast.train import train

    config, before = one_good_epoch(packed, tmp_path)

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)  # a partial file, as a filling disk leaves it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(config, resume=True)
    assert (config.out / "last.pt").read_bytes() == before["last.pt"]
    assert not list(config.out.glob("*.tmp"))


def mounted_tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` at ``folder`` (a real full disk); skip where it cannot be mounted."""
    import subprocess

    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    import subprocess

    disk = mounted_tmpfs(tmp_path / "disk", "1m")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_pack_onto_a_full_disk_is_one_line_and_leaves_no_partial_file(synth_tree, small_disk):
    out = small_disk / "shards"
    code, output = cli("pack", synth_tree, "--out", out, "--workers", "1", "--shard-size", "64")
    assert_one_line_exit_2(code, output, "No space left on device", str(out))
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.endswith(".tmp") or n == ".pack.lock"], left
    assert all(n.endswith((".tar", ".idx")) or n == ".pack-state.jsonl" for n in left), left


def test_train_onto_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(
    packed, tmp_path, one_thread
):
    import subprocess

    disk = mounted_tmpfs(tmp_path / "disk", "20m")  # config, events and metrics fit; no checkpoint
    try:
        out = disk / "run"
        options = ["--loader", "dali-cpu", "--batch-size", "32", "--image-size", "48"]
        options += ["--num-threads", "1", "--amp", "off", "--epochs", "1", "--device", "cpu"]
        code, output = cli("train", packed, "--out", out, *options)
        assert_one_line_exit_2(code, output, str(out / "last.pt"), "No space left on device")
        assert not list(out.glob("*.pt*"))
    finally:  # lazily: the failed run's TensorBoard writer may still hold its events file
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_outputs_below_a_file_inside_the_input_or_in_a_missing_folder_fail_up_front(
    packed, synth_tree, tmp_path
):
    afile = tmp_path / "afile"
    afile.write_text("a user's file\n")
    code, output = cli("pack", synth_tree, "--out", afile / "shards", "--workers", "1")
    assert_one_line_exit_2(code, output, str(afile / "shards"), "is a file")
    code, output = cli(
        "train", packed, "--out", afile / "run", "--loader", "dali-cpu", "--device", "cpu"
    )
    assert_one_line_exit_2(code, output, str(afile / "run"), "is a file")
    assert afile.read_text() == "a user's file\n"
    tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
    code, output = cli("pack", tree, "--out", tree / "cropped_aligned" / "shards")
    assert_one_line_exit_2(code, output, "is inside the input tree")
    assert not (tree / "cropped_aligned" / "shards").exists()
    csv = tmp_path / "missing" / "bench.csv"
    code, output = cli("bench", "loaders", packed, "--loaders", "dali-cpu", "--csv", csv)
    assert_one_line_exit_2(code, output, str(csv), "no folder")
    assert "timing" not in output


# Unreadable and unwritable paths: root ignores permissions, so as root the CLI runs in a fresh
# process that imports what the commands need, then becomes user nobody, then runs them (the
# interpreter may live in root's home). A fresh process, not a fork of pytest: a fork of a process
# whose DALI and torch threads hold locks can deadlock.
NOBODY = 65534
AS_NOBODY = """
import importlib, os, pkgutil, sys
import affectfast.cli, affectfast.pack, affectfast.train, affectfast.predict
import affectfast.loaders.dali, affectfast.loaders.wds, torch.utils.tensorboard
import encodings
for module in pkgutil.iter_modules(encodings.__path__):  # codecs load on first use
    try:
        importlib.import_module("encodings." + module.name)
    except Exception:
        pass
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.argv = ["affectfast", *sys.argv[1:]]
affectfast.cli.main()
"""


def cli_as_nobody(*args) -> tuple[int, str]:
    """Run the affectfast CLI with ARGS as user nobody (where this process is root); (exit code,
    stdout + stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def public(tmp_path_factory):
    """A folder user nobody may enter (pytest's own tmp folders are private to root); skips when
    nobody cannot run this checkout's Python at all (a private home or checkout)."""
    import tempfile

    code, output = cli_as_nobody("--help")
    if code != 0:  # cannot happen as root; as another user, whatever it says
        pytest.skip(f"user nobody cannot run affectfast from this checkout: {output[-200:]}")
    folder = Path(tempfile.mkdtemp(prefix="affectfast-hostile-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_unreadable_inputs_and_unwritable_outputs_are_one_line_errors(synth_tree, packed, public):
    tree = Path(shutil.copytree(synth_tree, public / "tree"))
    shards = Path(shutil.copytree(packed, public / "shards"))
    for path in (tree, shards, *tree.rglob("*"), *shards.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)  # copies of pytest's private folders
    readonly, writable = public / "readonly", public / "writable"
    readonly.mkdir()
    readonly.chmod(0o555)
    writable.mkdir()
    writable.chmod(0o777)
    train = ["--loader", "dali-cpu", "--num-threads", "1", "--epochs", "1", "--device", "cpu"]
    annotation = next(tree.rglob("AU_Detection_Challenge/Train_Set/*.txt"))
    video = next((tree / "cropped_aligned").iterdir())
    tar = shards / "train-000001.tar"
    cases = [
        (
            lambda: annotation.chmod(0),
            ["pack", tree, "--out", writable / "o1", "--workers", "1"],
            [str(annotation), "Permission denied"],
        ),
        (
            lambda: (annotation.chmod(0o644), video.chmod(0)),
            ["pack", tree, "--out", writable / "o2", "--workers", "1"],
            [str(video), "Permission denied"],
        ),
        (
            lambda: video.chmod(0o755),
            ["pack", tree, "--out", readonly / "o", "--workers", "1"],
            [str(readonly), "cannot write into"],
        ),
        (
            lambda: None,
            ["train", shards, "--out", readonly / "run", *train],
            [str(readonly), "cannot write into"],
        ),
        (
            lambda: tar.chmod(0),
            ["train", shards, "--out", writable / "run", *train],
            [str(tar), "ermission denied"],
        ),
    ]
    for prepare, args, expected in cases:
        prepare()
        code, output = cli_as_nobody(*args)
        assert_one_line_exit_2(code, output, *expected)
    assert not (writable / "o1").exists() and not (writable / "o2").exists()
