"""Staging a pack to node-local disk (affectfast.stage), train --stage-dir, DALI's storage options.

Stages copy the session's packed synthetic shards (tests/conftest.py) between temporary folders and
compare bytes, stamps and mtimes; the training test runs one tiny dali-cpu epoch.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from affectfast.cli import main
from affectfast.config import TrainConfig
from affectfast.errors import DataError
from affectfast.loaders import build_loader
from affectfast.shards import MANIFEST, load_manifest
from affectfast.stage import LOCK, STAMP, TEMP_SUFFIX, stage
from affectfast.train import train
from affectfast.verify import verify


def pack_files(folder: Path) -> list[str]:
    """Every tar and .idx the manifest of ``folder`` lists."""
    manifest = load_manifest(folder)
    return [
        name
        for entry in manifest["splits"].values()
        for shard in entry["shards"]
        for name in (shard["name"], shard["index"])
    ]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != LOCK}


def assert_same_pack(source: Path, local: Path) -> None:
    """``local`` holds exactly ``source``'s pack, byte for byte, and nothing half-written."""
    for name in [*pack_files(source), MANIFEST]:
        assert (local / name).read_bytes() == (source / name).read_bytes(), name
    assert not list(local.glob(f"*{TEMP_SUFFIX}")) and not list(local.glob(f".*{TEMP_SUFFIX}"))
    staged = {p.name for p in local.iterdir() if p.suffix in (".tar", ".idx")}
    assert staged == set(pack_files(source))
    assert verify(local) == []


@pytest.fixture
def source(packed, tmp_path):
    """A copy of the session's pack that a test may change."""
    return Path(shutil.copytree(packed, tmp_path / "source"))


def test_stage_copies_verifies_and_then_reuses(source, tmp_path):
    local = tmp_path / "local"
    first = stage(source, local)
    assert (first.copied, first.reused) == (len(pack_files(source)), 0)
    assert first.copied_bytes == sum((source / n).stat().st_size for n in pack_files(source))
    assert_same_pack(source, local)
    stamp = json.loads((local / STAMP).read_text())
    assert stamp["manifest_sha256"] and set(stamp["files"]) == set(pack_files(source))

    before = mtimes(local)
    second = stage(source, local)
    assert (second.copied, second.copied_bytes, second.reused) == (0, 0, first.copied)
    assert mtimes(local) == before  # nothing rewritten, the stamp included


def test_a_changed_source_restages_only_what_changed(source, synth_tree, tmp_path):
    from affectfast.pack import PackConfig, pack

    local = tmp_path / "local"
    stage(source, local)
    val = [n for n in pack_files(source) if n.startswith("val-")]
    val_mtimes = {n: (local / n).stat().st_mtime_ns for n in val}
    # Another train shuffle: new train shards and manifest; val (video/frame order) is unchanged.
    other = tmp_path / "other"
    pack(PackConfig(root=synth_tree, out=other, workers=1, shard_size=64, seed=1))
    assert (other / MANIFEST).read_bytes() != (source / MANIFEST).read_bytes()
    result = stage(other, local)
    assert result.reused == len(val) and result.copied == len(pack_files(other)) - len(val)
    assert_same_pack(other, local)
    assert {n: (local / n).stat().st_mtime_ns for n in val} == val_mtimes

    # Fewer, larger shards: the old pack's extra shards go (only files a stage put there).
    (local / "notes.txt").write_text("mine")
    larger = tmp_path / "larger"
    pack(PackConfig(root=synth_tree, out=larger, workers=1, shard_size=500, seed=0))
    stage(larger, local)
    assert_same_pack(larger, local)
    assert (local / "notes.txt").read_text() == "mine"


def test_a_corrupted_staged_file_is_detected_and_replaced(source, tmp_path):
    local = tmp_path / "local"
    stage(source, local)
    tar = local / pack_files(source)[0]
    idx = local / pack_files(source)[1]

    def flip_a_byte(path: Path) -> os.stat_result:
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return st

    old = flip_a_byte(tar)
    os.utime(tar, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))  # a later write: newer mtime
    result = stage(source, local)
    assert result.copied == 1 and result.copied_bytes == tar.stat().st_size
    assert_same_pack(source, local)

    idx.write_bytes(idx.read_bytes()[:-10])  # truncated: the size differs
    assert stage(source, local).copied == 1
    assert_same_pack(source, local)

    # Same size, mtime put back: a stat cannot see it; recheck re-hashes and can.
    old = flip_a_byte(tar)
    os.utime(tar, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert stage(source, local).copied == 0
    assert stage(source, local, recheck=True).copied == 1
    assert_same_pack(source, local)


def test_a_corrupt_source_is_refused_and_leaves_no_file_under_its_name(source, packed, tmp_path):
    name = pack_files(source)[2]
    data = bytearray((source / name).read_bytes())
    data[-2000] ^= 0xFF
    (source / name).write_bytes(bytes(data))
    local = tmp_path / "local"
    with pytest.raises(DataError, match="sha256 differs from the manifest"):
        stage(source, local)
    assert not (local / name).exists() and not (local / MANIFEST).exists()
    assert not list(local.glob(f".*{TEMP_SUFFIX}"))

    shutil.copyfile(packed / name, source / name)
    index = source / pack_files(source)[3]
    index.write_text("".join(index.read_text().splitlines(keepends=True)[:-1]))  # a line short
    with pytest.raises(DataError, match="truncated index"):
        stage(source, local)
    assert not (local / index.name).exists()


def test_a_killed_stage_leaves_whole_files_and_the_next_one_finishes(source, tmp_path, monkeypatch):
    import affectfast.stage as stage_module

    local = tmp_path / "local"
    copy, calls = stage_module._copy, []

    def killed_on_the_third_file(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return copy(*args)

    monkeypatch.setattr(stage_module, "_copy", killed_on_the_third_file)
    monkeypatch.setattr(stage_module, "STAMP_EVERY_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        stage(source, local)
    monkeypatch.undo()
    assert not (local / MANIFEST).exists()  # not a complete pack
    names = pack_files(source)
    for name in names[:2]:
        assert (local / name).read_bytes() == (source / name).read_bytes()
    assert not any((local / name).exists() for name in names[2:])
    (local / f".{names[3]}.12345{TEMP_SUFFIX}").write_bytes(b"half")  # what SIGKILL leaves
    result = stage(source, local)
    assert (result.copied, result.reused) == (len(names) - 2, 2)
    assert_same_pack(source, local)


def test_not_enough_space_is_a_clear_error(source, tmp_path, monkeypatch):
    import affectfast.stage as stage_module

    local = tmp_path / "local"
    needed = sum((source / n).stat().st_size for n in pack_files(source))
    monkeypatch.setattr(
        stage_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 0, 1000)
    )
    with pytest.raises(DataError) as error:
        stage(source, local)
    assert str(local) in str(error.value) and f"{needed:,} bytes needed" in str(error.value)
    assert "1,000 available" in str(error.value)
    assert not [p for p in local.iterdir() if p.name != LOCK]  # nothing copied
    result = CliRunner().invoke(main, ["stage", str(source), "--to", str(local)])
    assert result.exit_code == 2 and "not enough free space to stage" in result.output


def test_staging_into_the_pack_or_another_pack_is_refused(source, packed, tmp_path):
    with pytest.raises(DataError, match="is the pack itself"):
        stage(source, source)
    with pytest.raises(DataError, match="did not write"):
        stage(source, packed)


def test_two_concurrent_stages_both_succeed_with_one_copy(source, tmp_path):
    """Both wait on a lock this test holds, then one copies and the other finds the copy."""
    local = tmp_path / "local"
    local.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "affectfast", "stage", str(source), "--to", str(local)]
    with open(local / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        logs = [tmp_path / f"stage{i}.err" for i in range(2)]
        children = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log.open("w"))
            for log in logs
        ]
        waiting = f"waiting for process {os.getpid()} staging into {local}"
        deadline = time.monotonic() + 120
        while not all(waiting in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            time.sleep(0.1)
    outputs = [child.communicate(timeout=120)[0].decode() for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    copies = [line for line in outputs if f"copied {len(pack_files(source))} files" in line]
    reuses = [line for line in outputs if "reused the staged copy" in line]
    assert len(copies) == 1 and len(reuses) == 1, outputs
    assert_same_pack(source, local)


@pytest.mark.parametrize("options", [dict(dont_use_mmap=True), dict(read_ahead=True)])
def test_dali_storage_options_read_the_same_samples(packed, options):
    def read(**kw):
        loader = build_loader(
            "dali-cpu", packed, "val", ("va", "expr", "au"), 16, image_size=32, with_keys=True, **kw
        )
        return list(loader)

    default, other = read(num_threads=1), read(num_threads=1, **options)
    assert len(default) == len(other) > 1
    for a, b in zip(default, other):
        assert a.keys == b.keys
        assert torch.equal(a.images, b.images)
        for task in a.labels:
            assert torch.equal(a.labels[task], b.labels[task])
            assert torch.equal(a.masks[task], b.masks[task])


def test_train_from_a_staged_copy_and_resume_without_it(source, packed, tmp_path):
    """The staged copy is what is read; config.json keeps the user's path; --resume accepts either."""
    small = dict(loader="dali-cpu", batch_size=32, image_size=48, num_threads=1, amp="off")
    small.update(epochs=2, device="cpu")  # the CPU tier, even on a GPU node: exact asserts
    reference = train(TrainConfig(shards=source, out=tmp_path / "direct", **small), stop_after=1)

    local = tmp_path / "local"
    stage(source, local)
    for name in pack_files(source)[::2]:  # from here on only the staged copy holds the tars
        (source / name).write_bytes(b"")
    out = tmp_path / "staged"
    staged = train(TrainConfig(shards=source, out=out, stage_dir=local, **small), stop_after=1)
    timing = ("images_per_s", "epoch_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in staged] == [
        {k: v for k, v in r.items() if k not in timing} for r in reference
    ]
    saved = json.loads((out / "config.json").read_text())
    assert saved["shards"] == str(source) and saved["stage_dir"] == str(local)

    # --resume without --stage-dir (the source readable again) continues the same run.
    for name in pack_files(source)[::2]:
        shutil.copyfile(packed / name, source / name)
    resumed = train(TrainConfig(shards=source, out=out, **small), resume=True)
    assert [r["epoch"] for r in resumed] == [2]
