"""dist.py's decisions that need no process group: which CUDA device a process takes, and
main_decides / gather_to_main in one process. Their multi-process behaviour is tested end to end
in tests/test_run_folder.py (gloo) and by the gpu tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from affectfast.dist import (
    DistInfo,
    cuda_device_index,
    gather_to_main,
    main_decides,
    setup_distributed,
    teardown_distributed,
)
from affectfast.errors import DataError


@pytest.mark.parametrize(
    "local_rank,visible,expected",
    [
        (0, 8, 0),  # torchrun on a node whose processes all see its 8 GPUs
        (5, 8, 5),
        (0, 1, 0),
        (5, 1, 0),  # one GPU per task (CUDA_VISIBLE_DEVICES=<its own>): it is device 0
        (1, 2, 1),
    ],
)
def test_each_process_takes_its_local_rank_or_the_one_gpu_it_sees(local_rank, visible, expected):
    assert cuda_device_index(local_rank, visible, "0") == expected


@pytest.mark.parametrize("local_rank,visible", [(2, 2), (7, 4), (0, 0)])
def test_too_few_visible_gpus_for_the_local_rank_is_refused_in_one_line(local_rank, visible):
    with pytest.raises(DataError) as info:
        cuda_device_index(local_rank, visible, "2,3")
    message = str(info.value)
    assert "\n" not in message and f"LOCAL_RANK={local_rank}" in message
    assert f"sees {visible} CUDA devices (CUDA_VISIBLE_DEVICES '2,3')" in message
    unset = str(pytest.raises(DataError, cuda_device_index, local_rank, visible).value)
    assert "CUDA_VISIBLE_DEVICES unset" in unset


def test_without_a_process_group_main_decides_is_the_call_itself():
    info = DistInfo()
    assert main_decides(lambda: {"resume": True}, info) == {"resume": True}
    with pytest.raises(DataError, match="refused"):
        main_decides(lambda: (_ for _ in ()).throw(DataError("x", "refused")), info)
    assert gather_to_main({"rank": 0}, info) == [{"rank": 0}]


@pytest.mark.gpu
def test_a_process_bound_to_one_gpu_trains_on_device_0_whatever_its_local_rank():
    """Per-task binding: LOCAL_RANK 3 with CUDA_VISIBLE_DEVICES naming one GPU."""
    script = (
        "import torch\n"
        "from affectfast.dist import setup_distributed\n"
        "info = setup_distributed(True)\n"
        "print(info.device, torch.cuda.current_device(), torch.cuda.device_count())\n"
    )
    env = {**os.environ, "LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "0"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["cuda:0", "0", "1"]


@pytest.mark.gpu
def test_setup_distributed_without_torchrun_takes_the_first_gpu(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    info = setup_distributed(True)
    try:
        assert info.device == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    finally:
        teardown_distributed()
