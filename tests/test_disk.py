"""disk.py: the bounded file lock names its holder, the atomic writer's two modes, and what each
I/O error means for a caller."""

import errno
import subprocess
import sys
import time

import pytest

from helpers import lock_held_by_another_process
from ptmoe_serve.disk import (StoreBusy, StoreFull, StoreReadOnly, classify, file_lock,
                              write_atomically)


def test_a_lock_held_by_another_process_is_refused_after_the_timeout(tmp_path):
    path = tmp_path / "lock"
    with lock_held_by_another_process(path):
        began = time.monotonic()
        with pytest.raises(StoreBusy) as busy:
            with file_lock(path, timeout=0.3, what="the test store"):
                pass
        assert 0.3 <= time.monotonic() - began < 2
        assert "the test store is locked by another process" in str(busy.value)
        assert "--store-lock-timeout" in str(busy.value)
    with file_lock(path, timeout=0.3):  # a dead holder lets go
        pass


def test_a_waiting_process_reads_who_holds_the_lock(tmp_path):
    path = tmp_path / "lock"
    waiter = ("import sys; from pathlib import Path; from ptmoe_serve.disk import file_lock\n"
              "try:\n with file_lock(Path(sys.argv[1]), timeout=0.1): print('got it')\n"
              "except Exception as e: print(e)")
    with file_lock(path):
        told = subprocess.run([sys.executable, "-c", waiter, str(path)], capture_output=True,
                              text=True, check=True).stdout
    assert "got it" not in told and "pid" in told and "since" in told, told
    assert path.read_text() == ""  # the holder's note goes with the lock


def test_atomic_writes_replace_or_create_exclusively(tmp_path):
    target = tmp_path / "file"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        write_atomically(target, b"three", exclusive=True)
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing left behind


@pytest.mark.parametrize("code,kind,status,api_code", [
    (errno.ENOSPC, StoreFull, 507, "store_full"), (errno.EDQUOT, StoreFull, 507, "store_full"),
    (errno.EFBIG, StoreFull, 507, "store_full"),
    (errno.EROFS, StoreReadOnly, 503, "store_read_only"),
    (errno.EACCES, StoreReadOnly, 503, "store_read_only"),
    (errno.EIO, None, 503, "store_io_error")])
def test_io_errors_are_answers_a_caller_can_act_on(tmp_path, code, kind, status, api_code):
    error = classify(OSError(code, "x"), tmp_path)
    assert kind is None or isinstance(error, kind)
    assert (error.status, error.code) == (status, api_code)
    assert str(tmp_path) in str(error)
