"""``rblora.utils.lockfile.hold``: one holder at a time, named to the others; the OS releases it
when the holder dies; nothing left behind after a normal release."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import rblora.utils.lockfile as lockfile
from rblora.utils.lockfile import LockHeld, hold

SRC = Path(lockfile.__file__).resolve().parents[2]

HOLDER = """
import sys, time
from rblora.utils.lockfile import hold
with hold(sys.argv[1], "the thing"):
    print("held", flush=True)
    time.sleep(600)
"""

pytestmark = pytest.mark.skipif(lockfile.fcntl is None, reason="holder names need fcntl")


def start_holder(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "--marker"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_and_command(tmp_path):
    lock = tmp_path / "sub" / ".x.lock"
    proc = start_holder(lock)
    try:
        for _ in range(2):  # trying does not wipe the holder's line
            with pytest.raises(LockHeld) as info, hold(lock, "the thing"):
                pass
            message = str(info.value)
            assert message.startswith("the thing is in use by another run (pid ")
            assert f"pid {proc.pid} on " in message and f"-c {lock} --marker" in message
            assert str(lock) in message
        assert lock.read_text().startswith(f"pid {proc.pid} on ")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # the OS released the lock with the process; the file stays, with the dead holder's line
    assert lock.is_file()
    with hold(lock, "the thing"):
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    assert not lock.exists()


def test_the_same_process_cannot_hold_it_twice(tmp_path):
    lock = tmp_path / ".x.lock"
    held = pytest.raises(LockHeld, match=f"pid {os.getpid()}")
    with hold(lock, "the thing"), held, hold(lock, "the thing"):
        pass
    with hold(lock, "the thing"):  # released after the outer block
        pass


def test_release_removes_the_file_and_the_folders_it_created(tmp_path):
    lock = tmp_path / "a" / "b" / ".x.lock"
    with hold(lock, "the thing"):
        assert lock.is_file()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("")
    with pytest.raises(RuntimeError), hold(lock, "the thing"):
        raise RuntimeError
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["keep.txt"]


def test_a_file_deleted_by_its_last_holder_is_not_locked(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder deleted it must not take
    the deleted file for the lock: it would hold it next to a new holder of the new file."""
    lock = tmp_path / ".x.lock"
    lock.write_text("")
    stale = os.open(lock, os.O_RDWR)
    lock.unlink()  # what the previous holder does on release
    real_open, calls = os.open, []

    def open_(path, flags, mode=0o777):
        calls.append(path)
        return stale if len(calls) == 1 else real_open(path, flags, mode)

    monkeypatch.setattr(lockfile.os, "open", open_)
    with hold(lock, "the thing"):
        assert len(calls) == 2 and lock.read_text().startswith(f"pid {os.getpid()}")


def test_wait_takes_the_lock_once_its_holder_lets_go_and_refuses_after_the_wait(tmp_path):
    import threading
    import time

    lock = tmp_path / ".x.lock"
    proc = start_holder(lock)
    try:
        start = time.monotonic()
        with pytest.raises(LockHeld, match=f"pid {proc.pid}"), hold(lock, "the thing", wait=0.3):
            pass
        assert time.monotonic() - start >= 0.3  # it tried again until the wait was over
    finally:
        proc.kill()
        proc.wait(timeout=60)
    released = threading.Event()
    with hold(lock, "the thing"):
        threading.Timer(0.3, released.set).start()

        def waiter():
            with hold(lock, "the thing", wait=30):
                got.append(released.is_set())

        got: list = []
        thread = threading.Thread(target=waiter)
        thread.start()
        released.wait(10)
    thread.join(30)
    assert got == [True]  # it got the lock, and only after the first holder let go
    assert not lock.exists()
