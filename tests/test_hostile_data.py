"""Hostile and careless input on the data side: names in manifests and stamps, locks and
temporaries, folders of the user's own files, FIFOs where files belong, malformed or absurd
manifests, a scheduler's SIGTERM to pack, and packs resumed or extended.

Every case runs the real command on real bytes (the session's synthetic pack, copied and damaged)
and must end in a clean refusal naming the file, or in the correct result; nothing outside the
command's folders is touched and nothing hangs (cases that hung run in a child with a timeout).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from affectfast.cli import main
from affectfast.errors import DataError
from affectfast.loaders import build_loader
from affectfast.pack import PackConfig, pack
from affectfast.shards import MANIFEST, load_manifest
from affectfast.stage import LOCK, STAMP, stage
from affectfast.tasks import TASKS
from affectfast.verify import verify

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 64  # as the `packed` fixture packs


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def pack_copy(packed, tmp_path):
    """A private copy of the session's pack that a test may damage."""
    return Path(shutil.copytree(packed, tmp_path / "pack"))


def edit_manifest(folder: Path, change) -> Path:
    """Apply ``change(manifest)`` to ``folder``'s manifest.json; return its path."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


def first_train_shard(manifest: dict) -> dict:
    return manifest["splits"]["train"]["shards"][0]


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file below ``folder`` (links not followed): (inode, mtime, bytes or link target)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            found[str(path)] = (info.st_ino, info.st_mtime_ns, os.readlink(path).encode())
        elif path.is_file():
            found[str(path)] = (info.st_ino, info.st_mtime_ns, path.read_bytes())
    return found


def run_module(*args: str, timeout: float = 60, memory: int | None = None):
    """``python -m affectfast ARGS`` in a child (this checkout), killed after ``timeout`` s; with
    ``memory`` (bytes) its address space is capped, so an unbounded read fails instead of
    exhausting the machine."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def limit():
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-m", "affectfast", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=limit,
    )


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


def pack_quiet(root: Path, out: Path, **kwargs) -> dict:
    kwargs = {"workers": 1, "shard_size": SHARD_SIZE, "seed": 0, **kwargs}
    return pack(PackConfig(root=root, out=out, **kwargs), progress=False)


def output_files(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.suffix in (".tar", ".idx") or p.name == MANIFEST
    }


# --- 1. names from a manifest or a stamp: a plain file of the pack folder, never a way out --------


@pytest.mark.parametrize("how", ["absolute", "climbs", "link"])
@pytest.mark.parametrize("field", ["name", "index"])
def test_a_manifest_name_that_leaves_the_pack_is_refused_by_every_reader(
    pack_copy, tmp_path, how, field
):
    entry = first_train_shard(load_manifest(pack_copy))
    real = pack_copy / entry[field]
    victim = tmp_path / ("victim" + real.suffix)
    shutil.copyfile(real, victim)  # the very bytes the manifest lists: only the name is wrong
    if how == "link":
        real.unlink()
        real.symlink_to(victim)
    else:
        name = str(victim) if how == "absolute" else f"../{victim.name}"
        edit_manifest(pack_copy, lambda m: first_train_shard(m).update({field: name}))
    before = snapshot(tmp_path)
    local = tmp_path / "local"

    with pytest.raises(DataError) as info:
        stage(pack_copy, local)
    expected = real if how == "link" else pack_copy / MANIFEST
    assert info.value.path == expected, str(info.value)
    problems = verify(pack_copy)
    assert any(str(expected) in p for p in problems), problems
    for kind in ("wds", "dali-cpu"):
        with pytest.raises(DataError):
            build_loader(kind, pack_copy, "train", TASKS, 4, image_size=32, num_threads=1)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(str(local))} == before
    assert not local.exists() or not any(p.suffix in (".tar", ".idx") for p in local.iterdir())


def test_verify_never_reads_a_device_the_manifest_names(pack_copy):
    edit_manifest(pack_copy, lambda m: first_train_shard(m).update({"name": "/dev/zero"}))
    edit_manifest(pack_copy, lambda m: m["splits"]["val"]["shards"][0].update(index="/dev/zero"))
    result = run_module("verify", str(pack_copy), "--workers", "1", memory=3 << 30)
    assert result.returncode in (1, 2), result.stderr[-2000:]
    assert "/dev/zero" in result.stdout + result.stderr and "MemoryError" not in result.stderr


def test_a_tampered_stage_stamp_deletes_nothing_outside(pack_copy, tmp_path):
    local = tmp_path / "local"
    stage(pack_copy, local)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    stamp = json.loads((local / STAMP).read_text())
    stamp["manifest_sha256"] = "0" * 64  # the manifest changed: stage looks at every entry
    stamp["files"]["../victim.txt"] = {"bytes": 9, "sha256": "0" * 64, "mtime_ns": 0}
    (local / STAMP).write_text(json.dumps(stamp))
    with pytest.raises(DataError) as info:
        stage(pack_copy, local)
    assert info.value.path == local / STAMP and "../victim.txt" in str(info.value)
    assert victim.read_text() == "precious\n"


# --- 2. locks and temporaries are never opened through a planted link ----------------------------


def test_a_planted_stage_lock_link_truncates_nothing(pack_copy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    local = tmp_path / "local"
    local.mkdir()
    (local / LOCK).symlink_to(victim)
    with pytest.raises(DataError, match="symbolic link"):
        stage(pack_copy, local)
    assert victim.read_text() == "precious\n"


def test_a_planted_pack_lock_link_truncates_nothing(synth_tree, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".pack.lock").symlink_to(victim)
    with pytest.raises(DataError, match="symbolic link"):
        pack_quiet(synth_tree, out)
    assert victim.read_text() == "precious\n"
    assert not list(out.glob("*.tar"))


def test_a_planted_state_file_link_is_refused(synth_tree, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".pack-state.jsonl").symlink_to(victim)
    with pytest.raises(DataError, match="symbolic link"):
        pack_quiet(synth_tree, out)
    assert victim.read_text() == "precious\n"


# --- 4. stage never replaces or deletes the user's files -----------------------------------------


def test_stage_into_a_folder_of_the_users_files_is_refused_naming_it(pack_copy, tmp_path):
    local = tmp_path / "mine"
    local.mkdir()
    (local / "train-000000.tar").write_bytes(b"my own tar")
    (local / ".draft.staging").write_bytes(b"my own draft")
    before = snapshot(local)
    with pytest.raises(DataError, match="did not write") as info:
        stage(pack_copy, local)
    assert info.value.path == local and "2 entries" in str(info.value)
    assert snapshot(local) == before  # not even a lock file was added
    result = CliRunner().invoke(main, ["stage", str(pack_copy), "--to", str(local)])
    assert result.exit_code == 2 and str(local) in one_error_line(result.output)
    # An empty folder, or one a killed stage left (its lock alone), is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK).write_text("12345\n")
    assert stage(pack_copy, empty).copied > 0


# --- 7. verify checks the manifest's frame sizes against the JPEG headers ------------------------


def test_verify_reports_frame_sizes_the_jpegs_do_not_have(pack_copy):
    def lie(manifest):
        sizes = manifest["splits"]["train"]["frame_sizes"]
        ((text, count),) = sizes.items()
        manifest["splits"]["train"]["frame_sizes"] = {"32x32": count}

    edit_manifest(pack_copy, lie)
    problems = verify(pack_copy)
    assert any("frame sizes" in p and "32x32" in p for p in problems), problems


# --- 10. a FIFO or a device where a file belongs is refused at once ------------------------------


def test_a_fifo_shard_in_a_stage_source_is_refused_without_holding_the_lock(pack_copy, tmp_path):
    name = first_train_shard(load_manifest(pack_copy))["name"]
    (pack_copy / name).unlink()
    os.mkfifo(pack_copy / name)
    local = tmp_path / "local"
    result = run_module("stage", str(pack_copy), "--to", str(local), timeout=60)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(pack_copy / name) in line and "FIFO" in line


def test_verify_reports_a_fifo_shard_and_index_without_hanging(pack_copy):
    manifest = load_manifest(pack_copy)
    fifos = [
        pack_copy / manifest["splits"]["train"]["shards"][0]["name"],
        pack_copy / manifest["splits"]["val"]["shards"][0]["index"],
    ]
    for fifo in fifos:
        fifo.unlink()
        os.mkfifo(fifo)
    result = run_module("verify", str(pack_copy), "--workers", "1", timeout=60)
    assert result.returncode == 1, result.stderr[-2000:]
    for fifo in fifos:
        assert any(str(fifo) in line and "FIFO" in line for line in result.stdout.splitlines()), (
            result.stdout
        )


def test_a_fifo_test_list_is_refused_at_once(holdout_tree, tmp_path):
    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    result = run_module("pack", str(holdout_tree), "--out", str(out), "--test-videos", str(fifo))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(fifo) in line and "FIFO" in line


def test_a_fifo_annotation_file_is_refused_at_once(synth_tree, tmp_path):
    tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
    annotation = sorted(tree.rglob("*.txt"))[0]
    annotation.unlink()
    os.mkfifo(annotation)
    result = run_module("pack", str(tree), "--out", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(annotation) in line and "FIFO" in line


# --- 11, 14, 16. one manifest check, before any work, for every command ---------------------------


def _drop(*keys):
    def change(manifest):
        *parents, last = keys
        target = manifest
        for key in parents:
            target = target[key]
        del target[last]

    return change


def _set(*keys, value):
    def change(manifest):
        *parents, last = keys
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = value

    return change


SHARD = ("splits", "train", "shards", 0)
BAD_MANIFESTS = {
    "no splits": (_drop("splits"), "splits"),
    "splits a list": (_set("splits", value=[]), "splits"),
    "split a string": (_set("splits", "val", value="x"), "splits.val"),
    "no shards": (_drop("splits", "train", "shards"), "splits.train"),
    "no bytes": (_drop(*SHARD, "bytes"), "bytes"),
    "bytes a string": (_set(*SHARD, "bytes", value="31467520"), "bytes"),
    "bytes 10^15": (_set(*SHARD, "bytes", value=10**15), "bytes"),
    "negative samples": (_set(*SHARD, "samples", value=-1), "samples"),
    "counts 10^18": (_set(*SHARD, "counts", "va", value=10**18), "counts"),
    "counts a list": (_set(*SHARD, "counts", value=[1, 2, 3]), "counts"),
    "sha256 a number": (_set(*SHARD, "sha256", value=7), "sha256"),
    "no frame sizes": (_drop("splits", "val", "frame_sizes"), "frame_sizes"),
    "frame size text": (_set("splits", "val", "frame_sizes", value={"axb": 3}), "frame_sizes"),
    "no stats": (_drop("splits", "val", "stats"), "stats"),
    "negative frame count": (_set("frame_counts", value={"v": -3}), "frame_counts"),
    "frame count 10^12": (_set("frame_counts", value={"v": 10**12}), "frame_counts"),
    "bad files a dict": (_set("splits", "val", "bad_files", value={}), "bad_files"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_a_malformed_or_absurd_manifest_is_one_line_naming_it_in_every_command(
    pack_copy, tmp_path, case
):
    change, field = BAD_MANIFESTS[case]
    path = edit_manifest(pack_copy, change)
    with pytest.raises(DataError) as info:
        load_manifest(pack_copy)
    assert info.value.path == path and field in str(info.value), str(info.value)

    with pytest.raises(DataError) as info:
        stage(pack_copy, tmp_path / "local")
    assert info.value.path == path, str(info.value)
    assert verify(pack_copy) == [str(info.value)]
    result = CliRunner().invoke(main, ["stage", str(pack_copy), "--to", str(tmp_path / "l2")])
    assert result.exit_code == 2 and str(path) in one_error_line(result.output)
    result = CliRunner().invoke(main, ["verify", str(pack_copy), "--workers", "1"])
    assert result.exit_code == 1 and str(path) in result.output
    assert "Traceback" not in result.output
    for kind in ("wds", "dali-cpu"):  # before the first batch, not after an epoch
        with pytest.raises(DataError) as info:
            build_loader(kind, pack_copy, "val", TASKS, 4, image_size=32, num_threads=1)
        assert info.value.path == path


def test_stage_blames_a_manifest_size_its_tar_does_not_have_not_free_space(
    pack_copy, tmp_path, monkeypatch
):
    import affectfast.stage as stage_module

    entry = first_train_shard(load_manifest(pack_copy))
    edit_manifest(pack_copy, _set(*SHARD, "bytes", value=entry["bytes"] + 512))
    free = shutil._ntuple_diskusage(10**9, 0, 1000)  # no room: the size is what is wrong here
    monkeypatch.setattr(stage_module.shutil, "disk_usage", lambda path: free)
    with pytest.raises(DataError) as info:
        stage(pack_copy, tmp_path / "local")
    assert info.value.path == pack_copy / entry["name"], str(info.value)
    assert "free space" not in str(info.value) and "manifest" in str(info.value)


# --- 12. errors quote a bounded excerpt ----------------------------------------------------------


def test_a_huge_name_in_a_test_list_is_quoted_in_a_bounded_line(holdout_tree, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("v" * 10_000_000 + "\n")
    result = run_module(
        "pack", str(holdout_tree), "--out", str(tmp_path / "out"), "--test-videos", str(listed)
    )
    assert result.returncode == 2 and len(result.stderr) < 2000, len(result.stderr)
    line = one_error_line(result.stderr)
    assert f"{listed}:1:" in line


# --- 15. a scheduler's SIGTERM stops pack's workers too, and the rerun resumes --------------------

# Run as a script file: spawned workers import it as __mp_main__, so they are slowed down too, and
# each records its process id where the test can see it.
SLOW_PACK = textwrap.dedent("""
    import os, sys, time
    import affectfast.pack as p

    member = p.tar_member

    def slow_member(name, data):  # ~6 s per 16-sample shard: workers are mid-shard at the signal
        time.sleep(0.1)
        return member(name, data)

    p.tar_member = slow_member
    if __name__ == "__mp_main__":
        with open(os.environ["PACK_WORKER_PIDS"], "a") as f:
            f.write(f"{os.getpid()}\\n")
    if __name__ == "__main__":
        from affectfast.cli import main
        main(sys.argv[1:])
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_pack_stops_its_workers_and_the_rerun_resumes(synth_tree, tmp_path, sig):
    reference = tmp_path / "reference"
    pack_quiet(synth_tree, reference, shard_size=16)
    script, pids, out = tmp_path / "slow_pack.py", tmp_path / "pids.txt", tmp_path / "out"
    script.write_text(SLOW_PACK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PACK_WORKER_PIDS": str(pids)}
    args = ["pack", str(synth_tree), "--out", str(out), "--workers", "2", "--shard-size", "16"]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # not a pipe: workers share it
        process = subprocess.Popen([sys.executable, str(script), *args], env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".*.tar.tmp")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(out.glob(".*.tar.tmp")), "no worker started writing"
        time.sleep(0.2)
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    workers = [int(line) for line in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 1  # the workers go with the main process, not a shard later
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "pack's workers outlived it"
    if sig == signal.SIGTERM:  # a clean stop: nothing half-written is left behind
        assert process.returncode != 0 and not list(out.glob(".*.tmp"))
    assert not (out / MANIFEST).exists()
    result = run_module(*args, timeout=120)  # at once, as a scheduler's requeue does
    assert result.returncode == 0, result.stderr[-2000:]
    assert output_files(out) == output_files(reference)
    assert not list(out.glob(".*.tmp"))


# --- 16, 20. a pack resumed with lists spelled otherwise, or extended by a test split -------------


def test_adding_a_test_split_reuses_the_train_and_val_shards(
    holdout_tree, holdout_lists, packed_holdout, tmp_path, monkeypatch
):
    import affectfast.pack as pack_module

    out = tmp_path / "out"
    pack_quiet(holdout_tree, out)  # the README's first step
    labelled = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".tar"}
    written = []
    original = pack_module.write_shard
    monkeypatch.setattr(
        pack_module,
        "write_shard",
        lambda job, context: written.append(job.name) or original(job, context),
    )
    pack_quiet(holdout_tree, out, test_lists=holdout_lists)  # then the test split
    assert written and all(name.startswith("test-") for name in written), written
    assert {n: (out / n).stat().st_mtime_ns for n in labelled} == labelled
    assert output_files(out) == output_files(packed_holdout)  # as if packed at once
    assert verify(out) == []


def test_a_resume_with_the_test_lists_spelled_otherwise_reuses_everything(
    holdout_tree, holdout_lists, tmp_path, monkeypatch
):
    lists = tmp_path / "lists"
    lists.mkdir()
    for _, path in holdout_lists:
        shutil.copyfile(path, lists / path.name)
    monkeypatch.chdir(tmp_path)
    relative = tuple((task, Path("lists") / path.name) for task, path in holdout_lists)
    out = tmp_path / "out"
    pack_quiet(holdout_tree, out, test_lists=relative)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".tar"}
    (tmp_path / "linked").symlink_to(lists)
    for spelled in (
        tuple((task, (lists / path.name).resolve()) for task, path in holdout_lists),
        tuple((task, tmp_path / "linked" / path.name) for task, path in holdout_lists),
    ):
        pack_quiet(holdout_tree, out, test_lists=spelled)
        assert {n: (out / n).stat().st_mtime_ns for n in before} == before
    # Another test set is still never mixed in.
    other = lists / "other.txt"
    other.write_text((lists / holdout_lists[0][1].name).read_text().split()[0] + "\n")
    with pytest.raises(DataError, match="test lists changed"):
        pack_quiet(holdout_tree, out, test_lists=(("va", other),))


# --- 17. pack says which challenge folders it found ----------------------------------------------


def test_pack_reports_the_tasks_it_found_and_warns_of_a_missing_one(synth_tree, tmp_path):
    from affectfast.affwild2 import find_annotation_dirs, read_tree
    from affectfast.tasks import valid_mask

    result = run_module("pack", str(synth_tree), "--out", str(tmp_path / "all"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    videos = read_tree(find_annotation_dirs(synth_tree))
    for task in TASKS:
        for split in ("train", "val"):
            mine = [v for v in videos if v.split == split]
            frames = sum(int(valid_mask(task, getattr(v, task)).sum()) for v in mine)
            count = sum(bool(valid_mask(task, getattr(v, task)).any()) for v in mine)
            expected = f"{split} {count} videos, {frames:,} frames"
            line = next(line for line in result.stderr.splitlines() if line.startswith(f"{task}:"))
            assert expected in line, (expected, line)
    assert "warning" not in result.stderr

    tree = Path(shutil.copytree(synth_tree, tmp_path / "tree"))
    expr = next(tree.rglob("EXPR_Recognition_Challenge"))
    expr.rename(expr.with_name("EXPR_Recognition_Challenge_v2"))
    result = run_module("pack", str(tree), "--out", str(tmp_path / "some"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "warning" in line)
    assert "expr" in warning and "EXPR_Recognition_Challenge" in warning and str(tree) in warning
    assert not any(line.startswith("expr:") for line in result.stderr.splitlines())
