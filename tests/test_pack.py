"""The shard writer on real bytes: round trip, determinism, DALI/webdataset/GNU tar readability,
resume after a kill, bad JPEGs, and the JPEG checks themselves."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import affectfast.pack as pack_module
from affectfast.affwild2 import find_annotation_dirs, image_path, read_tree, sample_key
from affectfast.cli import main
from affectfast.errors import DataError
from affectfast.jpeg import JpegError, check_jpeg
from affectfast.pack import STATE, PackConfig, pack
from affectfast.shards import MANIFEST, tar_end, tar_member, tarfile_header
from affectfast.tasks import LABEL_EXT, TASKS, decode_label, valid_mask
from affectfast.verify import verify

SHARD_SIZE = 64  # as the `packed` fixture packs


# --- helpers --------------------------------------------------------------------------------------


def read_shards(out: Path, split: str | None = None) -> list[tuple[str, str, dict[str, bytes]]]:
    """(shard, key, {ext: bytes}) of every sample, in manifest and tar order (read with tarfile)."""
    manifest = json.loads((out / MANIFEST).read_text())
    samples = []
    for name, entry in manifest["splits"].items():
        if split not in (None, name):
            continue
        for shard in entry["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    if not samples or samples[-1][1] != key or samples[-1][0] != shard["name"]:
                        samples.append((shard["name"], key, {}))
                    samples[-1][2][ext] = tar.extractfile(member).read()
    return samples


def source_samples(root: Path) -> dict[str, tuple[Path, str, dict[str, np.ndarray]]]:
    """key -> (image path, split, {task: label}) for every frame the reader keeps."""
    dirs = find_annotation_dirs(root)
    expected = {}
    for video in read_tree(dirs):
        for i, frame in enumerate(video.frames):
            labels = {
                task: getattr(video, task)[i]
                for task in TASKS
                if valid_mask(task, getattr(video, task)[i : i + 1])[0]
            }
            expected[sample_key(video.name, int(frame))] = (
                image_path(dirs.frames, video.name, int(frame)),
                video.split,
                labels,
            )
    return expected


def output_files(out: Path) -> dict[str, bytes]:
    """Every shard, index and the manifest of a pack output, by name."""
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.suffix in (".tar", ".idx") or p.name == MANIFEST
    }


def final_names(out: Path) -> list[str]:
    return sorted(
        p.name for p in out.iterdir() if p.suffix in (".tar", ".idx") or p.name == MANIFEST
    )


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))


def pack_quiet(root: Path, out: Path, **kwargs) -> dict:
    kwargs = {"workers": 1, "shard_size": SHARD_SIZE, "seed": 0, **kwargs}
    return pack(PackConfig(root=root, out=out, **kwargs), progress=False)


@pytest.fixture
def tree_copy(synth_tree, tmp_path):
    """A private copy of the synthetic tree that a test may damage."""
    return Path(shutil.copytree(synth_tree, tmp_path / "tree"))


def a_val_frame(root: Path) -> Path:
    """The image of a kept val frame (val shards are written last, so earlier shards exist)."""
    kept = [path for path, split, _ in source_samples(root).values() if split == "val"]
    return kept[len(kept) // 2]


# --- round trip and layout ------------------------------------------------------------------------


def test_round_trip_every_sample_bytes_and_labels(synth_tree, packed):
    expected = source_samples(synth_tree)
    samples = read_shards(packed)
    assert sorted(key for _, key, _ in samples) == sorted(expected)  # every frame exactly once
    for _, key, components in samples:
        path, _, labels = expected[key]
        assert components["jpg"] == path.read_bytes()  # never re-encoded
        assert set(components) == {"jpg", *(LABEL_EXT[t] for t in labels)}
        for task, value in labels.items():
            np.testing.assert_array_equal(
                decode_label(task, components[LABEL_EXT[task]]), np.asarray(value).reshape(-1)
            )


def test_split_order_and_shard_sizes(synth_tree, packed):
    expected = source_samples(synth_tree)
    manifest = json.loads((packed / MANIFEST).read_text())
    for split in ("train", "val"):
        keys = [key for _, key, _ in read_shards(packed, split)]
        assert {k for k, (_, s, _) in expected.items() if s == split} == set(keys)
        in_order = sorted(keys)  # video/frame order: the reader's order, keys zero-padded
        if split == "val":
            assert keys == in_order
        else:
            assert keys != in_order  # globally shuffled
        sizes = [shard["samples"] for shard in manifest["splits"][split]["shards"]]
        assert sizes[:-1] == [SHARD_SIZE] * (len(sizes) - 1) and 0 < sizes[-1] <= SHARD_SIZE
        assert sum(sizes) == manifest["splits"][split]["samples"] == len(keys)


def test_manifest_stats_match_the_source(synth_tree, packed):
    expected = source_samples(synth_tree)
    manifest = json.loads((packed / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["config"]["shard_size"] == SHARD_SIZE
    for split in ("train", "val"):
        labels = [lab for _, s, lab in expected.values() if s == split]
        stats = manifest["splits"][split]["stats"]
        for task in TASKS:
            assert stats[task]["valid"] == sum(task in lab for lab in labels)
        expr = np.bincount([int(lab["expr"]) for lab in labels if "expr" in lab], minlength=8)
        assert stats["expr"]["class_counts"] == expr.tolist()
        au = np.sum([lab["au"] for lab in labels if "au" in lab], axis=0)
        assert stats["au"]["positive_counts"] == au.tolist()
        va = np.array([lab["va"] for lab in labels if "va" in lab], dtype=np.float64)
        np.testing.assert_allclose(stats["va"]["mean"], va.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(stats["va"]["std"], va.std(axis=0), atol=1e-12)
        assert manifest["splits"][split]["bad_files"] == []


def test_manifest_counts_per_shard_what_its_tar_holds(synth_tree, packed):
    """Per-shard task counts and JPEG bytes, per-split frame sizes: what readers use unparsed."""
    manifest = json.loads((packed / MANIFEST).read_text())
    for entry in manifest["splits"].values():
        sizes = {}
        for shard in entry["shards"]:
            with tarfile.open(packed / shard["name"]) as tar:
                members = tar.getmembers()
                jpegs = [m for m in members if m.name.endswith(".jpg")]
                for m in jpegs:
                    height, width = check_jpeg(tar.extractfile(m).read(), "header")
                    sizes[f"{height}x{width}"] = sizes.get(f"{height}x{width}", 0) + 1
            assert shard["jpeg_bytes"] == sum(m.size for m in jpegs)
            for task in TASKS:
                ext = f".{LABEL_EXT[task]}"
                assert shard["counts"][task] == sum(m.name.endswith(ext) for m in members)
        assert entry["frame_sizes"] == sizes and sum(sizes.values()) == entry["samples"]
        assert sum(s["counts"]["va"] for s in entry["shards"]) == entry["stats"]["va"]["valid"]


def test_tar_metadata_is_fixed_and_gnu_tar_lists_it(packed):
    for tar_path in sorted(packed.glob("*.tar")):
        raw = tar_path.read_bytes()
        assert raw[257:265] == b"ustar  \0"  # GNU magic
        assert len(raw) % tarfile.RECORDSIZE == 0
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        assert all(
            m.isreg()
            and m.mode == 0o644
            and m.mtime == 0
            and m.uid == m.gid == 0
            and m.uname == m.gname == ""
            for m in members
        )
        for m in members:  # our fast header encoder against tarfile's own, member by member
            assert raw[m.offset : m.offset_data] == tarfile_header(m.name, m.size)
        listed = subprocess.run(
            ["tar", "tf", str(tar_path)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert listed == [m.name for m in members]


def test_tar_bytes_equal_what_tarfile_writes():
    """Our member/end encoding is exactly tarfile.addfile + close with the same metadata."""
    members = [
        ("v/00001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
        ("v/00001.va", b"12345678"),
        ("v/00002.jpg", b"x" * 512),
        ("v/00002.au", b"\x01" * 12),
    ]
    ours = b"".join(tar_member(name, data) for name, data in members)
    ours += tar_end(len(ours))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    assert ours == buffer.getvalue()


def test_idx_equals_dali_wds2idx(packed, tmp_path):
    from wds2idx import IndexCreator

    for tar_path in sorted(packed.glob("*.tar")):
        theirs = tmp_path / f"{tar_path.stem}.idx"
        with IndexCreator(str(tar_path), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert (packed / f"{tar_path.stem}.idx").read_bytes() == theirs.read_bytes()


def test_webdataset_library_reads_the_shards(packed):
    import webdataset as wds

    expected = read_shards(packed)
    urls = [str(packed / shard) for shard, *_ in dict.fromkeys((s,) for s, _, _ in expected)]
    got = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    ]
    assert got == [(key, components) for _, key, components in expected]


def test_dali_webdataset_reader_reads_the_shards(packed):
    from nvidia.dali import fn, pipeline_def

    expected = read_shards(packed)
    shards = list(dict.fromkeys(shard for shard, _, _ in expected))
    exts = ["jpg", "va", "expr", "au"]
    batch = 32

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def reader():
        return tuple(
            fn.readers.webdataset(
                paths=[str(packed / s) for s in shards],
                index_paths=[str(packed / s.replace(".tar", ".idx")) for s in shards],
                ext=exts,
                missing_component_behavior="empty",
                name="reader",
            )
        )

    pipe = reader()
    pipe.build()
    assert pipe.epoch_size("reader") == len(expected)
    got = []
    while len(got) < len(expected):
        outputs = pipe.run()
        for i in range(batch):
            got.append([np.array(out[i]).tobytes() for out in outputs])
    for (_, _, components), arrays in zip(expected, got[: len(expected)]):
        assert arrays == [components.get(ext, b"") for ext in exts]


# --- determinism and resume -----------------------------------------------------------------------


def test_identical_for_one_and_two_workers_and_reruns(synth_tree, packed, tmp_path):
    reference = output_files(packed)
    pack_quiet(synth_tree, tmp_path / "two", workers=2)
    assert output_files(tmp_path / "two") == reference
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*.tar")}
    pack_quiet(synth_tree, tmp_path / "two", workers=2)  # rerun: reuses every shard
    assert output_files(tmp_path / "two") == reference
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*.tar")} == before
    assert leftovers(tmp_path / "two") == []


def test_pack_that_fails_midway_resumes_identically(synth_tree, packed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = pack_module.write_shard
    calls = []

    def dies_after_three(job, context):
        if len(calls) == 3:
            raise RuntimeError("killed")
        calls.append(job.name)
        return original(job, context)

    monkeypatch.setattr(pack_module, "write_shard", dies_after_three)
    with pytest.raises(RuntimeError):
        pack_quiet(synth_tree, out)
    assert final_names(out) == sorted(f"{n}{e}" for n in calls for e in (".tar", ".idx"))
    assert leftovers(out) == []

    rewritten = []
    monkeypatch.setattr(
        pack_module,
        "write_shard",
        lambda job, context: rewritten.append(job.name) or original(job, context),
    )
    pack_quiet(synth_tree, out)
    assert output_files(out) == output_files(packed)
    assert not set(rewritten) & set(calls)  # finished shards were reused
    assert leftovers(out) == []


SLOW_PACK = textwrap.dedent("""
    import sys, time
    import affectfast.pack as p
    member = p.tar_member
    def slow_member(name, data):          # ~100 ms per 16-sample shard: the kill lands mid-shard
        time.sleep(0.0015)
        return member(name, data)
    p.tar_member = slow_member
    config = p.PackConfig(root=sys.argv[1], out=sys.argv[2], workers=1, shard_size=16)
    p.pack(config, progress=False)
""")


def test_sigkilled_pack_leaves_no_partial_file_and_resumes(synth_tree, tmp_path):
    reference = tmp_path / "reference"
    pack_quiet(synth_tree, reference, shard_size=16)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_PACK, str(synth_tree), str(out)])
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("*.idx"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / MANIFEST).exists()
    # Whatever sits under a final name is complete and identical to the reference.
    for name in final_names(out):
        if name.endswith(".tar") and (out / name.replace(".tar", ".idx")).exists():
            assert (out / name).read_bytes() == (reference / name).read_bytes()
    pack_quiet(synth_tree, out, shard_size=16)
    assert output_files(out) == output_files(reference)
    assert leftovers(out) == []


def test_output_of_other_settings_or_unknown_origin_is_refused(synth_tree, packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    with pytest.raises(DataError, match="seed 0 -> 1"):
        pack_quiet(synth_tree, out, seed=1)
    (out / STATE).unlink()
    with pytest.raises(DataError, match="not written by"):
        pack_quiet(synth_tree, out)


def test_refused_pack_deletes_no_file_of_the_user(synth_tree, packed, tmp_path):
    """Temporaries are removed only in a folder accepted as this pack's, and only pack's names."""
    user_files = {"data.tar": b"user tar", ".notes.tmp": b"notes", ".train-000000.tar.tmp": b"x"}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name, data in user_files.items():
        (foreign / name).write_bytes(data)
    with pytest.raises(DataError, match="not written by"):
        pack_quiet(synth_tree, foreign)
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == user_files

    other_settings = tmp_path / "other"
    shutil.copytree(packed, other_settings)
    for name in (".notes.tmp", ".train-000000.tar.tmp"):
        (other_settings / name).write_bytes(user_files[name])
    with pytest.raises(DataError, match="seed 0 -> 1"):
        pack_quiet(synth_tree, other_settings, seed=1)
    assert leftovers(other_settings) == [".notes.tmp", ".train-000000.tar.tmp"]


def test_accepted_pack_removes_only_its_own_temporaries(synth_tree, packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    ours = [".train-000000.tar.tmp", ".val-000000.idx.tmp", f".{STATE}.tmp", f".{MANIFEST}.tmp"]
    theirs = [".notes.tmp", ".train-999999.tar.tmp", "train-000000.tar.tmp"]  # not pack's names
    for name in ours + theirs:
        (out / name).write_bytes(b"left behind")
    pack_quiet(synth_tree, out)
    assert leftovers(out) == sorted(theirs)
    assert output_files(out) == output_files(packed)


def run_pack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m affectfast pack ARGS`` in a child process (this checkout's package)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "affectfast", "pack", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_pack_into_a_folder_another_pack_holds_fails_at_once_naming_it(
    synth_tree, packed, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".pack.lock"
    with open(lock, "w") as holder:  # this test process plays the pack already running
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write(f"{os.getpid()}\n")
        holder.flush()
        result = run_pack(str(synth_tree), "--out", str(out), "--workers", "1", timeout=60)
        assert result.returncode == 2, result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith(f"error: {out}: locked by process {os.getpid()}"), line
        assert [p.name for p in out.iterdir()] == [lock.name]  # nothing written, nothing removed
        assert lock.read_text() == f"{os.getpid()}\n"
    # Released (a lock file left by a killed pack holds no lock either): packing goes ahead, the
    # output is byte-identical, and the lock file goes with the pack.
    pack_quiet(synth_tree, out, shard_size=SHARD_SIZE)
    assert output_files(out) == output_files(packed)
    assert not lock.exists()


def test_lock_taken_on_a_lock_file_unlinked_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """A pack ending between our open and our flock unlinks the file we opened: locking that inode
    would guard nothing, so lock_output opens the path again."""
    real_flock, locked = fcntl.flock, []

    def flock(fd, operation):
        if not locked:
            (tmp_path / pack_module.LOCK).unlink()  # what the ending pack does, lock still held
        locked.append(os.fstat(fd).st_ino)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with pack_module.lock_output(tmp_path):
        path = tmp_path / pack_module.LOCK
        assert len(locked) == 2 and path.stat().st_ino == locked[1]
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()


# --- files in the frames folders that are not frames ----------------------------------------------


def test_entries_that_are_not_frames_are_reported_and_counted_and_a_fifo_never_read(
    tree_copy, packed, tmp_path
):
    assert json.loads((packed / MANIFEST).read_text())["ignored_files"] == {}
    fifo = a_val_frame(tree_copy)
    fifo.unlink()
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: for ever
    (fifo.parent / "000001.jpg").write_bytes(b"meant as a frame")
    other = next(p for p in (tree_copy / "cropped_aligned").iterdir() if p != fifo.parent)
    (other / "00001.JPG").write_bytes(b"meant as a frame")
    out = tmp_path / "out"
    result = run_pack(str(tree_copy), "--out", str(out), "--workers", "1", "--shard-size", "16")
    assert result.returncode == 0, result.stderr
    assert f"ignored 2 entries in {fifo.parent} " in result.stderr
    assert f"ignored 1 entry in {other} " in result.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["ignored_files"] == {fifo.parent.name: 2, other.name: 1}
    keys = {key for _, key, _ in read_shards(out)}
    assert sample_key(fifo.parent.name, int(fifo.stem)) not in keys
    assert keys == set(source_samples(tree_copy))
    assert verify(out) == []


# --- bad JPEGs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, check",
    [
        (lambda data: b"", "header"),
        (lambda data: data[: len(data) // 2], "header"),
        (lambda data: data[: len(data) // 2], "full"),
        (lambda data: b"GIF89a" + data[6:], "full"),
    ],
)
def test_bad_jpeg_is_an_error_naming_it_and_nothing_is_left(tree_copy, tmp_path, damage, check):
    bad = a_val_frame(tree_copy)
    bad.write_bytes(damage(bad.read_bytes()))
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        pack_quiet(tree_copy, out, shard_size=16, check=check)
    assert str(bad) in str(error.value)
    assert final_names(out) == [] and leftovers(out) == [] and not (out / STATE).exists()


def test_bad_jpeg_early_with_workers_in_flight_leaves_nothing(tree_copy, packed, tmp_path):
    """Other workers may finish shards after the bad one: those must go too."""
    first_key = read_shards(packed, "train")[0][1]  # first train sample, any shard size
    bad = source_samples(tree_copy)[first_key][0]
    bad.write_bytes(bad.read_bytes()[:-10])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="truncated"):
        pack_quiet(tree_copy, out, workers=2, shard_size=4, check="header")
    assert final_names(out) == [] and leftovers(out) == [] and not (out / STATE).exists()


def test_bad_jpeg_cli_exit_2(tree_copy, tmp_path):
    bad = a_val_frame(tree_copy)
    bad.write_bytes(b"")
    result = CliRunner().invoke(
        main,
        [
            "pack",
            str(tree_copy),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--shard-size",
            "16",
        ],
    )
    assert result.exit_code == 2
    assert f"error: {bad}: bad image: empty file" in result.output
    assert final_names(tmp_path / "out") == []


def test_skip_bad_leaves_them_out_and_counts_them(tree_copy, tmp_path):
    expected = source_samples(tree_copy)
    bad = [a_val_frame(tree_copy), next(p for p, s, _ in expected.values() if s == "train")]
    for path in bad:
        path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "pack",
            str(tree_copy),
            "--out",
            str(out),
            "--workers",
            "1",
            "--shard-size",
            "16",
            "--check",
            "header",
            "--skip-bad",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 bad images skipped" in result.output
    manifest = json.loads((out / MANIFEST).read_text())
    listed = [
        item["path"]
        for split in ("train", "val")
        for item in manifest["splits"][split]["bad_files"]
    ]
    assert sorted(listed) == sorted(map(str, bad))
    keys = {key for _, key, _ in read_shards(out)}
    assert keys == set(expected) - {key for key, (p, _, _) in expected.items() if p in bad}
    for split in ("train", "val"):
        labels = [lab for key, (p, s, lab) in expected.items() if s == split and p not in bad]
        assert manifest["splits"][split]["samples"] == len(labels)
        for task in TASKS:
            assert manifest["splits"][split]["stats"][task]["valid"] == sum(
                task in lab for lab in labels
            )
    assert verify(out) == []


# --- config and CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"workers": 0}, {"shard_size": 0}, {"seed": -1}, {"check": "quick"}, {"root": None}]
)
def test_pack_config_is_validated(tmp_path, kwargs):
    with pytest.raises(ValueError):
        PackConfig(**{"root": tmp_path, "out": tmp_path / "out", **kwargs})


def test_cli_pack_smoke(synth_tree, packed, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "pack",
            str(synth_tree),
            "--out",
            str(out),
            "--workers",
            "1",
            "--shard-size",
            str(SHARD_SIZE),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"packed {out}" in result.output
    assert output_files(out) == output_files(packed)
    missing = CliRunner().invoke(main, ["pack", str(tmp_path / "nowhere"), "--out", str(out)])
    assert missing.exit_code == 2


# --- the unlabelled test split (--test-videos) ----------------------------------------------------


def listed_videos(lists) -> dict[str, list[str]]:
    """task -> the video names of its list file."""
    return {task: path.read_text().split() for task, path in lists}


def test_test_split_holds_every_image_of_the_listed_videos_alone_in_order(
    holdout_tree, holdout_lists, packed_holdout, packed
):
    names = sorted(set().union(*listed_videos(holdout_lists).values()))
    frames = holdout_tree / "cropped_aligned"
    expected = [
        (f"{video}/{path.stem}", path)
        for video in names
        for path in sorted((frames / video).glob("*.jpg"))
    ]
    samples = read_shards(packed_holdout, "test")
    assert [key for _, key, _ in samples] == [key for key, _ in expected]  # video/frame order
    for (_, _, components), (_, path) in zip(samples, expected):
        assert components == {"jpg": path.read_bytes()}  # the JPEG alone, never re-encoded
    # Train and val are the bytes a pack without a test set writes (same tree, same settings).
    labelled = {k: v for k, v in output_files(packed_holdout).items() if not k.startswith("test")}
    assert {k: v for k, v in labelled.items() if k != MANIFEST} == {
        k: v for k, v in output_files(packed).items() if k != MANIFEST
    }
    assert verify(packed_holdout, decode=True) == []


def test_manifest_records_test_lists_and_frame_counts(holdout_tree, holdout_lists, packed_holdout):
    manifest = json.loads((packed_holdout / MANIFEST).read_text())
    test = manifest["splits"]["test"]
    assert test["lists"] == {
        task: sorted(names) for task, names in listed_videos(holdout_lists).items()
    }
    assert test["samples"] == len(read_shards(packed_holdout, "test"))
    assert all(test["stats"][task]["valid"] == 0 for task in TASKS)
    assert manifest["config"]["test_lists"] == {
        task: str(path) for task, path in sorted(holdout_lists)
    }
    # Frame counts: lines after the header of each annotated video's files (the longest).
    counts = {}
    for path in (holdout_tree / "annotations").rglob("*.txt"):
        lines = len(path.read_text().splitlines()) - 1
        counts[path.stem] = max(counts.get(path.stem, 0), lines)
    assert manifest["frame_counts"] == counts
    assert not set(counts) & set(test["lists"]["va"])  # test videos have none


def test_a_pack_without_test_lists_has_no_test_split(packed):
    manifest = json.loads((packed / MANIFEST).read_text())
    assert list(manifest["splits"]) == ["train", "val"] and "test_lists" not in manifest["config"]
    assert not list(packed.glob("test-*"))


def test_test_split_is_identical_for_two_workers_and_resumes(
    holdout_tree, holdout_lists, packed_holdout, tmp_path
):
    out = tmp_path / "two"
    pack_quiet(holdout_tree, out, workers=2, test_lists=holdout_lists)
    assert output_files(out) == output_files(packed_holdout)
    for path in out.glob("test-*"):  # a pack killed before the test split: only it is redone
        path.unlink()
    pack_quiet(holdout_tree, out, test_lists=holdout_lists)
    assert output_files(out) == output_files(packed_holdout)
    with pytest.raises(DataError, match="test lists changed"):  # never mixed with another test set
        pack_quiet(holdout_tree, out, test_lists=holdout_lists[:1])


def _list(tmp_path, *lines, name="list.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _annotated(root: Path) -> dict[str, set[str]]:
    """video -> tasks that have an annotation file for it."""
    folders = {"VA": "va", "EXPR": "expr", "AU": "au"}
    found = {}
    for path in (root / "annotations").rglob("*.txt"):
        task = folders[path.parent.parent.name.split("_")[0]]
        found.setdefault(path.stem, set()).add(task)
    return found


def test_a_listed_video_with_labels_for_its_task_is_leakage_another_task_is_fine(
    holdout_tree, tmp_path
):
    annotated = _annotated(holdout_tree)
    video = sorted(v for v, tasks in annotated.items() if "va" in tasks)[0]
    leaky = _list(tmp_path, "# not a comment: a name", video, name="va.txt")
    leaky.write_text(f"\n{video}\n")
    with pytest.raises(
        DataError, match=rf"va.txt:2: video {video} is in the va test list.*leakage"
    ):
        pack_quiet(holdout_tree, tmp_path / "out", test_lists=[("va", leaky)])
    assert not (tmp_path / "out").exists() or final_names(tmp_path / "out") == []
    # A video lacking one task's labels may be in that task's test list: both splits hold it.
    video, task = next(
        (v, t) for v, tasks in sorted(annotated.items()) for t in TASKS if t not in tasks
    )
    manifest = pack_quiet(
        holdout_tree, tmp_path / "ok", test_lists=[(task, _list(tmp_path, video))]
    )
    assert manifest["splits"]["test"]["lists"] == {task: [video]}
    keys = [key for _, key, _ in read_shards(tmp_path / "ok", "test")]
    assert keys and {key.split("/")[0] for key in keys} == {video}
    labelled = {
        key.split("/")[0]
        for _, key, _ in read_shards(tmp_path / "ok", "train") + read_shards(tmp_path / "ok", "val")
    }
    assert video in labelled and video in manifest["frame_counts"]


@pytest.mark.parametrize(
    "lines, match",
    [
        (
            ["21-60-480x360", "no-such-video"],
            r"list.txt:2: unknown video no-such-video: no frames folder",
        ),
        (["../tree"], r"list.txt:1: '\.\./tree' is not a video name"),
        (["a/b"], r"list.txt:1: 'a/b' is not a video name"),
        (
            ["21-60-480x360", "", "21-60-480x360"],
            r"list.txt:3: video 21-60-480x360 is listed twice \(first on line 1\)",
        ),
        (["", "  "], r"list.txt: the test list names no video"),
    ],
)
def test_a_bad_test_list_is_an_error_naming_its_line(holdout_tree, tmp_path, lines, match):
    with pytest.raises(DataError, match=match):
        pack_quiet(holdout_tree, tmp_path / "out", test_lists=[("expr", _list(tmp_path, *lines))])
    assert not (tmp_path / "out").exists() or final_names(tmp_path / "out") == []


def test_cli_test_videos_one_list_for_every_task_or_one_per_task(
    holdout_tree, holdout_lists, packed_holdout, tmp_path
):
    def run(*options):
        command = ["pack", str(holdout_tree), "--workers", "1", "--shard-size", str(SHARD_SIZE)]
        return CliRunner().invoke(main, [*command, *options])

    per_task = [o for task, path in holdout_lists for o in ("--test-videos", f"{task}={path}")]
    result = run("--out", str(tmp_path / "per-task"), *per_task)
    assert result.exit_code == 0, result.output
    assert "test " in result.output
    assert output_files(tmp_path / "per-task") == output_files(packed_holdout)
    one = _list(tmp_path, *sorted(set().union(*listed_videos(holdout_lists).values())))
    result = run("--out", str(tmp_path / "one"), "--test-videos", str(one))
    assert result.exit_code == 0, result.output
    lists = json.loads((tmp_path / "one" / MANIFEST).read_text())["splits"]["test"]["lists"]
    assert lists == dict.fromkeys(TASKS, one.read_text().split())
    for options, message in (
        (["--test-videos", str(one), "--test-videos", f"va={one}"], "not both"),
        (["--test-videos", f"va={one}", "--test-videos", f"VA={one}"], "a second list for va"),
        (
            ["--test-videos", str(tmp_path / "missing.txt")],
            "missing.txt: cannot read the test list",
        ),
        (
            ["--test-videos", f"au={_list(tmp_path, 'nowhere')}"],
            "list.txt:1: unknown video nowhere",
        ),
    ):
        result = run("--out", str(tmp_path / "bad"), *options)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.strip().count("\n") <= 3  # usage + one line, never a traceback
    assert not list((tmp_path / "bad").glob("*.tar")) if (tmp_path / "bad").exists() else True


# --- JPEG checks ----------------------------------------------------------------------------------


def jpeg_bytes(size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_checks_accept_a_good_file_and_report_its_size():
    data = jpeg_bytes()
    assert check_jpeg(data, "header") == check_jpeg(data, "full") == (16, 24)
    assert check_jpeg(data + b"\0\0", "header") == (16, 24)  # padding after EOI


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello world", "start-of-image"),
        (jpeg_bytes()[:-300], "truncated"),
        (b"\xff\xd8\xff\xd9", "frame header"),
        (
            b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10\x03" + b"\0" * 9 + b"\xff\xd9",
            "16x0 pixels",
        ),
    ],
)
def test_jpeg_header_check_rejects(data, reason):
    with pytest.raises(JpegError, match=reason):
        check_jpeg(data, "header")


def test_jpeg_full_check_catches_what_the_header_cannot():
    data = bytearray(jpeg_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 6] = 0x33  # first component uses Huffman tables 3, never defined
    assert check_jpeg(bytes(data), "header") == (16, 24)
    with pytest.raises(JpegError, match="does not decode"):
        check_jpeg(bytes(data), "full")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with pytest.raises(JpegError):
        check_jpeg(png.getvalue(), "full")


def test_jpeg_header_check_rejects_bad_component_count():
    data = bytearray(jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 9] = 7
    with pytest.raises(JpegError, match="7 colour components"):
        check_jpeg(bytes(data), "header")
