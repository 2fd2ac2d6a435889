"""Thread counts from the CPUs a process may use (dist.cpu_budget), and the CLI's OpenMP wait policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from affectfast import dist
from affectfast.cli import _thread_count
from affectfast.config import EvalConfig, TrainConfig
from affectfast.dist import DistInfo, cpu_budget, omp_num_threads
from affectfast.train import loader_threads, set_torch_threads

CPU = DistInfo()
GPU = DistInfo(device=torch.device("cuda", 0))  # a value only: nothing here touches CUDA


@pytest.fixture
def eight_cpus(monkeypatch):
    """A process allowed on 8 CPUs, launched plainly (no torchrun variables, no OMP_NUM_THREADS)."""
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(8)))
    for name in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_budget_is_the_affinity_mask_shared_by_the_node_processes(eight_cpus, monkeypatch):
    assert cpu_budget() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_budget() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpu_budget() == 1  # never 0
    assert omp_num_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert omp_num_threads() == 3


def test_auto_loader_threads_all_per_gpu_a_quarter_on_the_cpu(eight_cpus, tmp_path, monkeypatch):
    auto = TrainConfig(shards=tmp_path, out=tmp_path / "run")
    assert auto.num_threads == "auto" and EvalConfig(tmp_path / "c.pt", tmp_path).num_threads
    assert loader_threads(auto, GPU) == 8 and loader_threads(auto, CPU) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this node
    assert loader_threads(auto, GPU) == 2 and loader_threads(auto, CPU) == 1
    explicit = TrainConfig(shards=tmp_path, out=tmp_path / "run", num_threads=3)
    assert loader_threads(explicit, GPU) == loader_threads(explicit, CPU) == 3


def test_torch_threads_are_capped_leaving_a_quarter(eight_cpus, monkeypatch, keep_torch_threads):
    torch.set_num_threads(16)
    set_torch_threads(GPU)
    assert torch.get_num_threads() == 16  # GPU runs are left alone
    set_torch_threads(CPU)
    assert torch.get_num_threads() == 6  # 8 less 2 for the loader
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: {0, 1})
    set_torch_threads(CPU)
    assert torch.get_num_threads() == 2  # a quarter of 2 rounds to none kept
    torch.set_num_threads(1)
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(8)))
    set_torch_threads(CPU)
    assert torch.get_num_threads() == 1  # never raised: a caller's smaller count stays
    torch.set_num_threads(16)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    set_torch_threads(CPU)
    assert torch.get_num_threads() == 16  # as OMP_NUM_THREADS says


def test_num_threads_is_auto_or_a_positive_int(tmp_path):
    for bad in (0, -1, "2", "many", True, 1.5):
        with pytest.raises(ValueError):
            TrainConfig(shards=tmp_path, out=tmp_path, num_threads=bad)
        with pytest.raises(ValueError):
            EvalConfig(tmp_path / "c.pt", tmp_path, num_threads=bad)
    config = TrainConfig(shards=tmp_path, out=tmp_path)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert _thread_count(None, None, "auto") == "auto" and _thread_count(None, None, "3") == 3
    for bad in ("0", "x", "-2"):
        with pytest.raises(Exception, match='expected "auto"'):
            _thread_count(None, None, bad)


@pytest.mark.parametrize(
    "given, spin",
    [(None, "0"), ("ACTIVE", None)],  # PASSIVE: no spinning; a policy the user chose is kept
)
def test_the_cli_makes_openmp_wait_passively_before_torch_loads(tmp_path, given, spin):
    """libgomp prints its settings when it loads (OMP_DISPLAY_ENV); the command then fails (exit 2)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if given:
        env["OMP_WAIT_POLICY"] = given
    command = [sys.executable, "-m", "affectfast", "train", str(tmp_path), "--out", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no manifest" in result.stderr
    if spin is None:
        assert f"OMP_WAIT_POLICY = '{given}'" in result.stderr
    else:
        assert f"GOMP_SPINCOUNT = '{spin}'" in result.stderr
