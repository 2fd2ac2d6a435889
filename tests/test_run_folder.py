"""One run per run folder, and a run folder only the main rank touches.

Real processes throughout: `affectfast train` started as torchrun starts one process per node
(RANK 0 and 1, LOCAL_RANK 0 each, gloo on the CPU), each with its own --out as node-local disks
give them, and two `train` runs into one --out at once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from affectfast.config import TrainConfig
from affectfast.errors import DataError
from affectfast.rundir import RunDir, load_checkpoint, read_metrics
from affectfast.safe_files import exclusive_lock
from affectfast.train import train

TRAIN = ["--epochs", "2", "--batch-size", "16", "--image-size", "32", "--num-threads", "1"]
TRAIN += ["--loader", "dali-cpu", "--device", "cpu"]  # the CPU tier: gloo, even on a GPU node
TIMEOUT_S = 240  # a hang ends here, as a failure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def run_two_nodes(shards: Path, outs: list[Path], *options: str) -> list[tuple[int | None, str]]:
    """``affectfast train`` as two single-process nodes of one torchrun job, rank r writing to
    ``outs[r]``; per rank (exit code, or None when it had to be killed at TIMEOUT_S; stderr)."""
    port = free_port()
    processes = []
    for rank, out in enumerate(outs):
        env = {
            **os.environ,
            **dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1"),
            **dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
        }
        command = [sys.executable, "-m", "affectfast", "train", str(shards), "--out", str(out)]
        processes.append(
            subprocess.Popen(
                [*command, *TRAIN, *options],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + TIMEOUT_S
    results = []
    try:
        for process in processes:
            try:
                _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
                results.append((process.returncode, stderr))
            except subprocess.TimeoutExpired:
                process.kill()
                results.append((None, process.communicate()[1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def assert_same_one_line_error(results, *expected: str) -> None:
    """Every rank exited 2 with one and the same error line holding ``expected``."""
    assert [code for code, _ in results] == [2, 2], [stderr[-1500:] for _, stderr in results]
    lines = [error_lines(stderr) for _, stderr in results]
    assert len(lines[0]) == 1 and lines[0] == lines[1], lines
    assert all(text in lines[0][0] for text in expected), lines[0]


def test_multi_node_resume_with_node_local_run_folders(packed, tmp_path):
    """Only rank 0 reads and writes the run folder: rank 1's (on another node) stays empty, and a
    refusal on rank 0 ends both ranks with its one line instead of a hang."""
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    outs[1].mkdir(parents=True)
    first = run_two_nodes(packed, outs, "--stop-after", "1")
    assert [code for code, _ in first] == [0, 0], [stderr[-1500:] for _, stderr in first]
    assert load_checkpoint(outs[0] / "last.pt")["epoch"] == 1

    changed = run_two_nodes(packed, outs, "--resume", "--lr", "0.0001")
    assert_same_one_line_error(changed, str(outs[0] / "config.json"), "lr changed")

    def busy(holder: str) -> None:
        raise AssertionError(f"process {holder} holds the lock this test takes")

    with exclusive_lock(RunDir(outs[0]).lock, on_busy=busy):
        locked = run_two_nodes(packed, outs, "--resume")
    assert_same_one_line_error(locked, str(outs[0]), f"locked by process {os.getpid()}")

    resumed = run_two_nodes(packed, outs, "--resume")
    assert [code for code, _ in resumed] == [0, 0], [stderr[-1500:] for _, stderr in resumed]
    assert [r["epoch"] for r in read_metrics(outs[0] / "metrics.jsonl")] == [1, 2]
    assert load_checkpoint(outs[0] / "last.pt")["epoch"] == 2
    assert list(outs[1].iterdir()) == []  # rank 1 never wrote its folder


def test_a_second_run_into_a_busy_run_folder_is_refused_naming_the_first(packed, tmp_path):
    from click.testing import CliRunner

    from affectfast.cli import main

    out = tmp_path / "run"
    lock = RunDir(out).lock
    command = [sys.executable, "-m", "affectfast", "train", str(packed), "--out", str(out)]
    first = subprocess.Popen(
        [*command, *TRAIN],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, "the first run ended without holding the folder's lock"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = CliRunner().invoke(main, ["train", str(packed), "--out", str(out), *TRAIN])
        stdout, stderr = first.communicate(timeout=TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.exit_code == 2, second.output
    assert error_lines(second.output) == [
        f"error: {out}: locked by process {first.pid}: another affectfast train is writing this "
        "run folder; wait for it to end or choose another --out"
    ]
    assert first.returncode == 0, stderr[-2000:]
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # its own alone
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and not lock.exists()
    # The first run's summary says where its files went.
    assert f"run folder {out} (2 of 2 epochs done)" in stdout and "best.pt        epoch" in stdout


def test_a_lock_planted_as_a_link_is_refused_and_its_target_untouched(packed, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    RunDir(out).lock.symlink_to(victim)
    config = TrainConfig(shards=packed, out=out, loader="dali-cpu", device="cpu", num_threads=1)
    with pytest.raises(DataError, match="is a symbolic link") as info:
        train(config)
    assert info.value.path == RunDir(out).lock
    assert victim.read_text() == "a user's file\n"
    assert sorted(p.name for p in out.iterdir()) == [".train.lock"]


def test_tasks_without_train_labels_are_refused_in_one_line_and_nothing_is_left(
    tmp_path, synth_tree
):
    """A pack whose tree had no VA folder: the default tasks va,expr,au are refused (a VA head
    would train on nothing), before the run folder is created."""
    import shutil

    from click.testing import CliRunner

    from affectfast.cli import main
    from affectfast.pack import PackConfig, pack

    tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
    shutil.rmtree(next(tree.rglob("VA_Estimation_Challenge")))
    shards = tmp_path / "shards"
    pack(PackConfig(root=tree, out=shards, workers=1, shard_size=64), progress=False)
    out = tmp_path / "runs" / "mtl"
    result = CliRunner().invoke(main, ["train", str(shards), "--out", str(out), *TRAIN])
    assert result.exit_code == 2, result.output
    assert error_lines(result.output) == [
        f"error: {shards / 'manifest.json'}: the train split has no va labels "
        "(splits.train.stats): train with --tasks expr,au, or pack a tree with those annotation "
        "folders"
    ]
    assert not (tmp_path / "runs").exists()  # neither the run folder nor the one above it
