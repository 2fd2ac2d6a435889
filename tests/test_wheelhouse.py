"""tools/wheelhouse.py: wheels cut into parts of bounded size and joined back byte for byte, with
every chunk and wheel checked (no network: the download step is pip's)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "wheelhouse.py"


@pytest.fixture(scope="module")
def wheelhouse():
    spec = importlib.util.spec_from_file_location("wheelhouse", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    sizes = {"big_pkg-1.0-py3-none-any.whl": 2_500_000, "small-2.0-py3-none-any.whl": 10}
    sizes["mid-0.1-cp312-cp312-manylinux_2_28_x86_64.whl"] = 700_000
    for name, size in sizes.items():
        (folder / name).write_bytes(os.urandom(size))
    return sorted(folder.iterdir())


def test_parts_are_bounded_and_join_restores_every_wheel(wheelhouse, wheels, tmp_path):
    part_bytes = 1 << 20
    folders = wheelhouse.write_parts(wheels, tmp_path / "house", part_bytes)
    assert len(folders) == 4  # 3,200,010 bytes in parts of 1 MiB
    for folder in folders:
        chunks = [p for p in folder.iterdir() if p.name != wheelhouse.RECORD]
        assert sum(p.stat().st_size for p in chunks) <= part_bytes
    joined = wheelhouse.join(tmp_path / "house", tmp_path / "wheels")
    assert sorted(p.name for p in joined) == [w.name for w in wheels]
    for wheel in wheels:
        assert (tmp_path / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()


def test_join_names_a_missing_part_and_a_damaged_chunk(wheelhouse, wheels, tmp_path):
    house = tmp_path / "house"
    folders = wheelhouse.write_parts(wheels, house, 1 << 20)
    chunk = next(p for p in folders[1].iterdir() if ".chunk" in p.name)
    data = bytearray(chunk.read_bytes())
    data[0] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="re-assembled bytes differ from the download"):
        wheelhouse.join(house, tmp_path / "wheels")
    assert not any((tmp_path / "wheels").glob(".*.joining"))
    for path in folders[2].iterdir():
        path.unlink()
    folders[2].rmdir()
    with pytest.raises(SystemExit, match="missing part-02 of 4"):
        wheelhouse.join(house, tmp_path / "wheels")


def test_the_record_lists_sizes_and_hashes(wheelhouse, wheels, tmp_path):
    folders = wheelhouse.write_parts(wheels, tmp_path / "house", 1 << 20)
    record = json.loads((folders[0] / wheelhouse.RECORD).read_text())
    assert record["parts"] == len(folders)
    for wheel in wheels:
        assert record["wheels"][wheel.name] == {
            "size": wheel.stat().st_size,
            "sha256": wheelhouse.sha256(wheel),
        }
        assert sum(c["size"] for c in record["chunks"][wheel.name]) == wheel.stat().st_size


def test_a_freeze_names_the_projects_a_node_has(wheelhouse, tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "torch==2.11.0\nNumPy==2.1.0\nscikit_learn @ file:///x.whl\n# comment\n-e .\n"
    )
    assert wheelhouse.installed_projects(freeze) == {"torch", "numpy", "scikit-learn"}
    assert (
        wheelhouse.wheel_project(Path("scikit_learn-1.9.1-cp312-cp312-any.whl")) == "scikit-learn"
    )
