"""``rblora.utils.atomic``: a folder replaced by ``atomic_dir``/``replace_dir`` survives a kill
between its two renames, and leftovers of killed writers are recovered or removed next time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import rblora.utils.atomic as atomic
from rblora.utils.atomic import atomic_dir, exclusive_dir, lock_path, recover, replace_dir

SRC = Path(atomic.__file__).resolve().parents[2]

#: Replaces ``target`` with a folder holding new.txt, SIGKILLed at the 2nd ``os.replace``: the old
#: folder has been moved aside, the new one is not in place yet.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import rblora.utils.atomic as atomic
real, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
with atomic.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def run_killed_writer(target: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], env=env)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return proc.pid


def dead_pid() -> int:
    """The id of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def make_old_folder(target: Path) -> None:
    target.mkdir()
    (target / "old.txt").write_text("old")


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_kill_between_the_renames_leaves_the_old_folder_aside(tmp_path):
    target = tmp_path / "out"
    make_old_folder(target)
    pid = run_killed_writer(target)
    old, tmp = names(tmp_path)  # no "out": the window the review found
    assert old.startswith(f".out.old-{pid}-") and tmp.startswith(f".out.tmp-{pid}-")
    assert names(tmp_path / old) == ["old.txt"] and names(tmp_path / tmp) == ["new.txt"]


def test_next_atomic_dir_puts_the_old_folder_back_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out"
    make_old_folder(target)
    run_killed_writer(target)
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("this writer fails too")
    assert names(tmp_path) == ["out"]
    assert (target / "old.txt").read_text() == "old"


def test_next_atomic_dir_after_a_kill_replaces_cleanly(tmp_path):
    target = tmp_path / "out"
    make_old_folder(target)
    run_killed_writer(target)
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("again")
    assert names(tmp_path) == ["out"]
    assert names(target) == ["new.txt"]


def test_recover_restores_when_the_target_is_missing(tmp_path):
    target = tmp_path / "out"
    make_old_folder(target)
    run_killed_writer(target)
    assert recover(target) is True
    assert names(tmp_path) == ["out"] and names(target) == ["old.txt"]
    assert recover(target) is False  # nothing left to do


def test_leftover_old_folder_is_removed_when_the_target_exists(tmp_path):
    # killed after the second rename, before the old folder was deleted
    target = tmp_path / "out"
    target.mkdir()
    (target / "new.txt").write_text("new")
    old = tmp_path / f".out.old-{dead_pid()}-0123456789ab"
    make_old_folder(old)
    assert recover(target) is False
    assert names(tmp_path) == ["out"] and names(target) == ["new.txt"]


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{dead_pid()}-0123456789ab"
    legacy = tmp_path / ".out.tmp-abcdef012345"  # older versions did not record the pid
    live = tmp_path / f".out.tmp-{os.getppid()}-0123456789ab"  # pytest's parent is running
    mine = tmp_path / f".out.tmp-{os.getpid()}-0123456789ab"
    stale_file = tmp_path / f".out.tmp-{dead_pid()}-ba9876543210"
    others = [tmp_path / ".out.tmp-notours", tmp_path / ".other.tmp-abcdef012345"]
    for folder in (dead, legacy, live, mine, *others):
        make_old_folder(folder)
    stale_file.write_text("half a file")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
    assert names(tmp_path) == sorted(p.name for p in (live, mine, target, *others))
    recover(target, locked=True)  # a lock holder knows that no writer is running
    assert names(tmp_path) == sorted(p.name for p in (target, *others))


def test_live_writers_old_folder_is_not_restored(tmp_path):
    # another process between its two renames right now: leave its folders alone
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{os.getppid()}-0123456789ab"
    make_old_folder(old)
    assert recover(target) is False
    assert names(tmp_path) == [old.name]


def test_interrupt_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    make_old_folder(target)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert names(tmp_path) == ["out"] and names(target) == ["old.txt"]


def test_replace_dir_recovers_first(tmp_path):
    target = tmp_path / "out"
    make_old_folder(tmp_path / f".out.old-{dead_pid()}-0123456789ab")
    built = tmp_path / "built"
    built.mkdir()
    (built / "new.txt").write_text("new")
    replace_dir(built, target)
    assert names(tmp_path) == ["out"] and names(target) == ["new.txt"]


def test_a_partly_deleted_old_folder_is_never_restored(tmp_path, monkeypatch):
    # the old folder is renamed to a temporary name before it is deleted
    target = tmp_path / "out"
    make_old_folder(target)
    seen = []
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, **kw: seen.append(Path(path).name))
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert seen and all(n.startswith(".out.tmp-") for n in seen)


def test_exclusive_dir_makes_a_second_holder_wait_and_cleans_every_leftover(tmp_path):
    target = tmp_path / "out"
    waited, order = [], []

    def second():
        with exclusive_dir(target, on_wait=waited.append) as lock:
            order.append(("second", lock))

    with exclusive_dir(target) as lock:
        assert lock == tmp_path / ".out.lock" and lock == lock_path(target)
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()
        with exclusive_dir(target, wait=False) as busy:
            assert busy is None  # not waiting, not holding
        # leftovers written while the lock is held (by this holder) are stale for the next one
        make_old_folder(tmp_path / f".out.tmp-{os.getpid()}-0123456789ab")
        make_old_folder(tmp_path / f".out.old-{os.getppid()}-0123456789ab")
        order.append(("first", lock))
    thread.join(30)
    assert waited == [lock] and order == [("first", lock), ("second", lock)]
    assert names(tmp_path) == [".out.lock", "out"]  # the old folder came back, the rest went
    assert names(target) == ["old.txt"]


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "plot.png"
    with atomic.atomic_file(target) as fh:
        fh.write(b"\x89PNG old")
    assert target.read_bytes() == b"\x89PNG old"
    with pytest.raises(OSError, match="disk full"), atomic.atomic_file(target) as fh:
        fh.write(b"\x89PNG half")
        raise OSError("disk full")
    assert target.read_bytes() == b"\x89PNG old" and names(tmp_path) == ["plot.png"]
    with atomic.atomic_file(target, text=True) as fh:
        fh.write("text é")
    assert target.read_text(encoding="utf-8") == "text é" and names(tmp_path) == ["plot.png"]
