"""verify: a good pack passes; each kind of damage is reported; the CLI exits 0 or 1."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest
from click.testing import CliRunner

from affectfast.cli import main
from affectfast.shards import MANIFEST
from affectfast.verify import verify


@pytest.fixture
def damaged(packed, tmp_path):
    """A private copy of the packed shards that a test may damage."""
    return shutil.copytree(packed, tmp_path / "shards")


def first_shard(out):
    return json.loads((out / MANIFEST).read_text())["splits"]["train"]["shards"][0]


def test_good_pack_verifies_with_and_without_decoding(packed):
    assert verify(packed) == []
    assert verify(packed, decode=True, workers=2) == []


def test_flipped_byte_is_reported(damaged):
    shard = damaged / first_shard(damaged)["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image, the header stays valid
    shard.write_bytes(bytes(data))
    problems = verify(damaged)
    assert any(str(shard) in p and "sha256" in p for p in problems)


def test_missing_shard_is_reported(damaged):
    shard = damaged / first_shard(damaged)["name"]
    shard.unlink()
    problems = verify(damaged)
    assert any(str(shard) in p and "missing" in p for p in problems)
    assert any("samples" in p for p in problems)  # the split's totals no longer add up


def test_wrong_index_is_reported(damaged):
    index = damaged / first_shard(damaged)["index"]
    lines = index.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(int(fields[1]) + 512)  # the first image's offset is off by a block
    index.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    problems = verify(damaged)
    assert problems == [
        f"{index}:2: does not match its tar (expected {' '.join(lines[1].split())[:80]!r})"
    ]


def test_manifest_counts_and_stats_are_checked(damaged):
    manifest = json.loads((damaged / MANIFEST).read_text())
    manifest["splits"]["val"]["stats"]["expr"]["class_counts"][0] += 1
    manifest["splits"]["val"]["stats"]["expr"]["valid"] += 1  # still adds up: checked on load
    manifest["splits"]["val"]["stats"]["au"]["valid"] -= 1
    manifest["splits"]["train"]["shards"][0]["samples"] += 1
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    problems = verify(damaged)
    assert any("expr class counts" in p for p in problems)
    assert any("valid au labels" in p for p in problems)
    assert any(
        p.endswith(f"samples, the manifest says {first_shard(damaged)['samples']}")
        for p in problems
    )


def test_decode_finds_a_corrupt_image_and_unlisted_files_are_reported(damaged):
    shard = damaged / first_shard(damaged)["name"]
    with tarfile.open(shard) as tar:
        image = next(m for m in tar if m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    sos = data.index(b"\xff\xda", image.offset_data)
    data[sos + 6] = 0x33  # undefined Huffman tables: markers still fine
    shard.write_bytes(bytes(data))
    (damaged / "extra.tar").write_bytes(b"")
    assert not any(image.name in p for p in verify(damaged))
    problems = verify(damaged, decode=True)
    assert any(image.name in p and "does not decode" in p for p in problems)
    assert any("extra.tar: not listed" in p for p in problems)


def test_no_manifest_is_one_problem(tmp_path):
    problems = verify(tmp_path)
    assert len(problems) == 1 and "no manifest" in problems[0]


def test_cli_verify_exit_codes(packed, damaged):
    good = CliRunner().invoke(main, ["verify", str(packed), "--workers", "1"])
    assert good.exit_code == 0, good.output
    assert f"{packed}: ok" in good.output
    (damaged / first_shard(damaged)["name"]).unlink()
    bad = CliRunner().invoke(main, ["verify", str(damaged), "--decode", "--workers", "1"])
    assert bad.exit_code == 1
    assert "missing" in bad.output
