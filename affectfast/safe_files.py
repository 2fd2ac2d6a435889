"""Files a user or a manifest names, opened so that nothing can hang, grow without bound or be
redirected: the one place every command reads such files and takes its locks.

- A file expected to hold data must be a *regular* file: a FIFO would block the reader forever
  (while it holds a lock, say), a device such as ``/dev/zero`` never ends. Files are opened with
  ``O_NONBLOCK`` (opening a FIFO never waits for a writer) and checked with ``fstat`` on the open
  descriptor, so the file checked is the file read.
- Reads are bounded: a caller says how large the file may be (``limit``, bytes), or hashes it
  in chunks (:func:`sha256_file`: a checkpoint's fingerprint).
- ``follow_links=False`` for names that come from a manifest or a stamp (they must be plain files
  in their folder, never a way out of it); a path the user typed may be a link to a regular file.
- Locks are opened with ``O_NOFOLLOW`` and must be regular files: a planted symbolic link named
  like a lock would otherwise have its target truncated. Temporaries are created with
  ``O_CREAT | O_EXCL`` (:func:`create_new`), which never opens an existing file or link.
- :func:`excerpt` quotes a rejected value in an error message, at most a few hundred characters
  however large or deeply nested the value is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import reprlib
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from affectfast.errors import DataError

CHUNK = 1 << 20  # bytes per read
SMALL_CHUNK = 1 << 16  # bytes per read of files known to be small (frames)
EXCERPT_CHARS = 160  # the most of a rejected value an error message quotes

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def describe_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words ("a FIFO (named pipe)", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | Path, *, follow_links: bool = True) -> os.stat_result:
    """``path``'s stat when it is a regular file (through links unless ``follow_links=False``);
    else a DataError saying what it is. A missing file raises the OSError (FileNotFoundError)."""
    info = os.stat(path) if follow_links else os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise DataError(path, f"is {describe_kind(info.st_mode)}, not a regular file")
    return info


def open_regular(
    path: str | Path, *, flags: int = os.O_RDONLY, follow_links: bool = True, what: str = "file"
) -> int:
    """A descriptor of the regular file ``path`` opened with ``flags`` (``os.O_RDONLY``,
    ``os.O_WRONLY | os.O_APPEND``, ...), in blocking mode; anything else is a DataError naming it.

    Opened with ``O_NONBLOCK`` (a FIFO never blocks the open) and checked with ``fstat`` on the
    descriptor; ``follow_links=False`` adds ``O_NOFOLLOW``. A missing file raises the OSError.
    """
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_links:
            raise DataError(
                path, f"is a symbolic link; the {what} must be a regular file"
            ) from None
        if error.errno == errno.ENXIO:  # a FIFO without a reader, opened to write
            kind = describe_kind(os.stat(path, follow_symlinks=follow_links).st_mode)
            raise DataError(path, f"is {kind}; the {what} must be a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(
                path, f"is {describe_kind(info.st_mode)}; the {what} must be a regular file"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(
    path: str | Path, *, limit: int, follow_links: bool = True, what: str = "file"
) -> bytes:
    """The whole of the regular file ``path``, at most ``limit`` bytes; else a DataError.

    ``what`` names the file in the message ("frame-count CSV", "manifest").
    """
    fd = open_regular(path, follow_links=follow_links, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise DataError(path, f"{size:,} bytes: a {what} holds at most {limit:,}")
        data = _read_at_most(fd, limit)
        if len(data) > limit:  # it grew while being read
            raise DataError(path, f"more than {limit:,} bytes: a {what} holds at most {limit:,}")
        return data
    finally:
        os.close(fd)


def sha256_file(path: str | Path, *, follow_links: bool = True, what: str = "file") -> str:
    """The sha256 (hex) of the regular file ``path``, read in chunks (memory stays bounded
    however large it is); anything but a regular file is a DataError, as in :func:`read_bytes`."""
    with os.fdopen(open_regular(path, follow_links=follow_links, what=what), "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_at_most(fd: int, limit: int, chunk_size: int = CHUNK) -> bytes:
    """What ``fd`` holds, read until its end or until ``limit + 1`` bytes (so a caller sees
    that there was more), ``chunk_size`` bytes a read."""
    parts, size = [], 0
    while size <= limit and (chunk := os.read(fd, min(chunk_size, limit + 1 - size))):
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def read_listed(path: str, *, limit: int) -> bytes:
    """The bytes of a file a directory listing just reported as regular (``os.scandir``'s
    ``is_file()``), at most ``limit + 1`` of them; the caller refuses a longer result.

    For millions of small files (frames) where one more system call per file shows: no ``fstat``.
    ``O_NONBLOCK`` still keeps a FIFO swapped in since the listing from blocking (it reads as
    empty), and the bound keeps a device from growing memory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:  # os.read allocates the size asked for: 64 KiB, not CHUNK, per 5 kB frame
        return _read_at_most(fd, limit, SMALL_CHUNK)
    finally:
        os.close(fd)


def create_new(path: str | Path, *, replace: bool = False, mode: int = 0o666) -> int:
    """A write descriptor of a file created at ``path`` (``mode & ~umask``), never opened through
    a link or onto an existing file (``O_CREAT | O_EXCL``, which refuses a planted link too).

    ``replace=True`` first removes whatever is at ``path`` (the link itself, never its target):
    for temporaries whose name the caller owns, a killed run's included.
    """
    if replace:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, mode)


def read_text(
    path: str | Path,
    *,
    limit: int,
    encoding: str = "utf-8",
    follow_links: bool = True,
    what: str = "file",
) -> str:
    """:func:`read_bytes` decoded as ``encoding``; text that does not decode is a DataError."""
    data = read_bytes(path, limit=limit, follow_links=follow_links, what=what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise DataError(
            path, f"the {what} is not {encoding} text (byte {error.start} cannot be decoded)"
        ) from None


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, *, on_busy: Callable[[str], None], remove: bool = False
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created if needed, holding this
    process id) for the ``with`` block.

    When another process holds it, ``on_busy(holder)`` is called with that process's id as text:
    it raises to refuse at once, or returns (after saying why) to wait for the lock. The file is
    opened without following links and must be a regular file. ``remove=True`` deletes it on exit
    (while still locked): a process that opened the old file retries on the new one.
    """
    path = Path(path)
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                on_busy(os.pread(fd, 64, 0).decode("ascii", errors="replace").strip() or "?")
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        if not remove or _same_file(fd, path):
            break
        os.close(fd)  # locked a file its last holder removed: that lock guards nothing
    try:
        os.ftruncate(fd, 0)  # a killed holder leaves its file (and process id) but no lock
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def _open_lock(path: Path) -> int:
    # O_RDWR opens a FIFO without waiting (Linux); fstat then refuses it. O_NONBLOCK for devices.
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DataError(
                path, "is a symbolic link: a lock file is never opened through one"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DataError(path, f"is {describe_kind(info.st_mode)}, not a lock file")
    os.set_blocking(fd, True)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxset, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 6, EXCERPT_CHARS, 60, 40


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """A bounded ``repr`` of ``value`` for an error message: nested and shared structures are
    cut by depth and length first (so formatting costs O(limit), not O(value)), then the text."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
