"""safe_files: regular files only (a FIFO never hangs a reader), bounded reads, links refused where
asked, locks never opened through a planted link, bounded excerpts in error messages."""

from __future__ import annotations

import os
import threading
import time

import pytest

from affectfast.errors import MAX_MESSAGE, DataError
from affectfast.safe_files import (
    check_regular,
    create_new,
    excerpt,
    exclusive_lock,
    open_regular,
    read_bytes,
    read_listed,
    read_text,
    sha256_file,
)


def test_read_bytes_reads_a_regular_file_and_through_a_link(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_bytes(b"video,frames\nv1,10\n")
    link = tmp_path / "link.csv"
    link.symlink_to(path)
    assert read_bytes(path, limit=100) == b"video,frames\nv1,10\n"
    assert read_bytes(link, limit=100) == b"video,frames\nv1,10\n"
    with pytest.raises(DataError, match="symbolic link; the manifest must be a regular file"):
        read_bytes(link, limit=100, follow_links=False, what="manifest")


def test_a_fifo_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"FIFO \(named pipe\); the test list must be a regular"):
        read_text(fifo, limit=100, what="test list")
    with pytest.raises(DataError, match="is a FIFO"):
        check_regular(fifo)
    assert time.monotonic() - start < 5  # no writer ever opens it: a blocking open would hang


def test_a_device_and_a_folder_are_refused(tmp_path):
    with pytest.raises(DataError, match="character device"):
        read_bytes("/dev/zero", limit=1 << 20)
    with pytest.raises(DataError, match="is a folder"):
        read_bytes(tmp_path, limit=10)
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "missing", limit=10)


def test_reads_are_bounded(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    assert len(read_bytes(path, limit=101)) == 101
    with pytest.raises(DataError, match="101 bytes: a smoothing file holds at most 100"):
        read_bytes(path, limit=100, what="smoothing file")


def test_read_text_names_undecodable_bytes(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"ok\n\xff\n")
    with pytest.raises(DataError, match="not utf-8 text .byte 3"):
        read_text(path, limit=100)


def test_a_lock_through_a_planted_link_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = tmp_path / ".stage.lock"
    lock.symlink_to(victim)
    with pytest.raises(DataError, match="symbolic link"):
        with exclusive_lock(lock, on_busy=lambda holder: None):
            pass
    assert victim.read_text() == "precious\n"


def test_a_lock_that_is_a_fifo_is_refused(tmp_path):
    lock = tmp_path / ".pack.lock"
    os.mkfifo(lock)
    with pytest.raises(DataError, match="FIFO"):
        with exclusive_lock(lock, on_busy=lambda holder: None):
            pass


def test_a_held_lock_names_its_holder_and_can_refuse_or_wait(tmp_path):
    lock = tmp_path / ".lock"
    seen = []

    def refuse(holder):
        raise DataError(tmp_path, f"locked by process {holder}")

    with exclusive_lock(lock, on_busy=refuse):
        assert lock.read_text() == f"{os.getpid()}\n"
        # flock locks belong to the open file: a second open in this process conflicts too.
        with pytest.raises(DataError, match=f"locked by process {os.getpid()}"):
            with exclusive_lock(lock, on_busy=refuse):
                pass
    # Free again: a waiter gets it without calling on_busy.
    with exclusive_lock(lock, on_busy=seen.append):
        pass
    assert seen == []


def test_a_waiting_lock_gets_it_when_released(tmp_path):
    lock = tmp_path / ".lock"
    entered = threading.Event()
    holders = []

    def hold():
        with exclusive_lock(lock, on_busy=lambda h: None):
            entered.set()
            time.sleep(0.3)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(5)
    start = time.monotonic()
    with exclusive_lock(lock, on_busy=holders.append):
        waited = time.monotonic() - start
    thread.join()
    assert holders == [str(os.getpid())] and waited > 0.1


def test_remove_deletes_the_lock_file_on_exit(tmp_path):
    lock = tmp_path / ".pack.lock"
    with exclusive_lock(lock, on_busy=lambda h: None, remove=True):
        assert lock.is_file()
    assert not lock.exists()


def test_excerpt_is_bounded_for_huge_and_deeply_shared_values():
    shared: list = [0]
    for _ in range(60):  # 2**60 paths through the structure: a full repr would never end
        shared = [shared, shared]
    start = time.monotonic()
    text = excerpt({"task_weights": shared, "name": "x" * 10_000_000})
    assert len(text) <= 160 and time.monotonic() - start < 1
    assert excerpt("short") == "'short'"


def test_data_error_messages_are_cut_to_a_line_of_bounded_length(tmp_path):
    error = DataError(tmp_path / "list.txt", "unknown video " + "v" * 10_000_000, 3)
    assert len(error.message) == MAX_MESSAGE and error.message.endswith("(cut off)")
    assert str(error).startswith(f"{tmp_path / 'list.txt'}:3: unknown video vvv")


def test_sha256_file_hashes_a_regular_file_and_refuses_anything_else(tmp_path):
    import hashlib

    path = tmp_path / "best.pt"
    path.write_bytes(b"weights" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"weights" * 1000).hexdigest()
    fifo = tmp_path / "last.pt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="FIFO .*; the checkpoint must be a regular file"):
        sha256_file(fifo, what="checkpoint")
    with pytest.raises(DataError, match="character device"):
        sha256_file("/dev/zero")  # never ends: refused, not read
    link = tmp_path / "link.pt"
    link.symlink_to(path)
    with pytest.raises(DataError, match="symbolic link"):
        sha256_file(link, follow_links=False)


def test_create_new_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    temp = tmp_path / ".train-000000.tar.tmp"
    temp.symlink_to(victim)
    with pytest.raises(FileExistsError):
        create_new(temp)
    os.close(create_new(temp, replace=True))  # the link goes, never its target
    assert victim.read_text() == "precious\n" and not temp.is_symlink() and temp.is_file()


def test_open_regular_appends_only_to_a_regular_file_not_through_a_link(tmp_path):
    state, victim = tmp_path / ".pack-state.jsonl", tmp_path / "victim.txt"
    victim.write_text("precious\n")
    state.symlink_to(victim)
    with pytest.raises(DataError, match="symbolic link; the pack state file"):
        open_regular(
            state, flags=os.O_WRONLY | os.O_APPEND, follow_links=False, what="pack state file"
        )
    state.unlink()
    os.mkfifo(state)
    with pytest.raises(DataError, match="FIFO"):
        open_regular(state, flags=os.O_WRONLY | os.O_APPEND, what="pack state file")
    assert victim.read_text() == "precious\n"


def test_read_listed_never_blocks_and_is_bounded(tmp_path):
    fifo = tmp_path / "00001.jpg"
    os.mkfifo(fifo)  # swapped in after a listing said "regular file": reads as empty, at once
    assert read_listed(str(fifo), limit=100) == b""
    assert len(read_listed("/dev/zero", limit=100)) == 101  # one more: the caller sees "too big"
    frame = tmp_path / "00002.jpg"
    frame.write_bytes(b"x" * 50)
    assert read_listed(str(frame), limit=100) == b"x" * 50
