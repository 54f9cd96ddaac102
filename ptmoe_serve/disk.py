"""Durable files on a store that can fill up, turn read-only or be locked by a peer: the one
atomic writer, the one file lock (bounded, naming its holder), and the errors a caller can act
on, each with the HTTP status and code the API answers with.

Every write here is whole or refused: a file is written beside its target, flushed, renamed
into place and its folder flushed, so a crash or a full disk leaves the old file or the new
one. A lock is tried without blocking until its timeout, so a stuck peer costs a bounded wait
and a clear answer, never a server that stops. Failpoints (as etcd's gofail) let the tests
kill a process at a named step of a change."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A named step at which this process kills itself (SIGKILL, as the OOM killer or a power cut
# would), for the fault-injection tests: read once, at import. "NAME@FILE" kills only the first
# process to reach NAME (the one that creates FILE), so that a restarted process goes on.
FAILPOINT, _, FAILPOINT_ONCE = os.environ.get("PTMOE_FAILPOINT", "").partition("@")
# How long a lock is tried before the caller is told the store is busy (--store-lock-timeout).
DEFAULT_LOCK_TIMEOUT = 5.0


class StoreError(Exception):
    """The store could not make a change; `status` and `code` are the API's answer."""

    status = 503
    code = "store_io_error"


class StoreFull(StoreError):
    status = 507
    code = "store_full"


class StoreReadOnly(StoreError):
    code = "store_read_only"


class StoreBusy(StoreError):
    code = "store_busy"


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def classify(error: OSError, where: Path) -> StoreError:
    """What an I/O error means for a caller, with a message naming the store and what to do."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in FULL:
        return StoreFull(f"the adapter store {where} is full ({reason}); free space there "
                         "(unloading with purge frees an adapter's folder) and try again")
    if error.errno in READ_ONLY:
        return StoreReadOnly(f"the adapter store {where} is read-only ({reason}): this server "
                             "serves what it holds and changes nothing; make changes where "
                             "the store is mounted writable")
    return StoreError(f"the adapter store {where} failed a write ({reason}); try again, and "
                      "check the volume if it persists")


@contextmanager
def store_errors(where: Path) -> Iterator[None]:
    """I/O errors inside the block become StoreErrors naming `where`."""
    try:
        yield
    except OSError as e:
        raise classify(e, where) from e


@contextmanager
def store_writes(folder: Path) -> Iterator[None]:
    """A change inside `folder` of the store (made if missing): refused at once on a read-only
    store, and its I/O errors as StoreErrors."""
    with store_errors(folder):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if read_only(existing):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        folder.mkdir(parents=True, exist_ok=True)
        yield


def read_only(folder: Path) -> bool:
    """Whether this process cannot write in `folder`: a read-only mount, or no permission."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return not os.access(folder, os.W_OK)


def failpoint(name: str) -> None:
    if FAILPOINT == name and _first_to_fail():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_to_fail() -> bool:
    if not FAILPOINT_ONCE:
        return True
    try:
        os.close(os.open(FAILPOINT_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def fsync_dir(path: Path) -> None:
    """Make a folder's entries durable (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, exclusive: bool = False) -> None:
    """`data` as `path`, durably: written beside it, flushed, renamed into place (`exclusive`:
    only if no file is there, FileExistsError otherwise), and the folder flushed. A reader
    sees the old file or the new one, never half of one; a failure leaves no temporary file."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        failpoint(f"staged:{path.name}")
        if exclusive:
            os.link(staging, path)  # fails if the target exists, as rename would not
            staging.unlink()
        else:
            os.replace(staging, path)
        fsync_dir(path.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: Path, timeout: float = DEFAULT_LOCK_TIMEOUT, what: str = "the store"
              ) -> Iterator[None]:
    """An exclusive lock on `path` across processes, tried without blocking for `timeout`
    seconds (0: once), then StoreBusy naming the holder. The holder writes who it is (pid,
    host, since) into the lock file; a process that dies lets go of the lock."""
    with open(path, "a+") as lock:
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusy(f"{what} is locked by another process ({_holder(path)}) "
                                    f"for longer than {timeout:g} s (--store-lock-timeout); "
                                    "try again shortly") from None
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(2 * pause, 0.1)
        try:
            _write_holder(lock, {"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": int(time.time())})
            yield
        finally:
            _write_holder(lock, None)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_holder(lock, holder: dict | None) -> None:
    """Best effort: a full disk must not refuse the lock (a purge then frees space)."""
    try:
        lock.seek(0)
        lock.truncate()
        if holder is not None:
            lock.write(json.dumps(holder))
        lock.flush()
    except OSError:
        pass


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text()[:1000])
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(holder["since"])))
        return f"pid {int(holder['pid'])} on {str(holder['host'])[:100]}, since {since}"
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return "holder unknown"
