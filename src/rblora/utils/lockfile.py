"""An exclusive lock held by one process for as long as it works, naming its holder.

``hold(path, what)`` takes an OS lock (``fcntl.flock``) on the file ``path`` without waiting and
writes one line into it saying who holds it: process id, host, start time and command. A second
process (or a second ``hold`` in the same process) gets :class:`LockHeld`, whose message quotes
that line. The OS drops the lock when the holder exits or is killed, so a crash never leaves a
folder locked; the file itself then stays (with the dead holder's line, overwritten by the next
holder). On a normal exit the file is deleted, and so are the folders ``hold`` created for it
if they are empty again, so a refused run leaves nothing behind.

Why not ``filelock``: it opens the lock file with ``O_TRUNC``, so every process that merely
*tries* the lock would wipe the holder's line. Here the file is opened without truncating, and a
process that locks a file which its previous holder has just deleted notices (the path no longer
leads to the file it locked) and locks the new one instead, so deleting the file is safe.
Where ``fcntl`` is missing (Windows) ``filelock`` is used and the holder is not named.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class LockHeld(ValueError):
    """Another process holds the lock; ``holder`` is its line (empty if it wrote none yet)."""

    def __init__(self, path: Path, what: str, holder: str):
        self.path, self.holder = path, holder
        who = holder or "a process that is just starting or did not say who it is"
        super().__init__(f"{what} is in use by another run ({who}; lock file {path})")


def holder_line() -> str:
    """``pid <pid> on <host>, started <local time>: <command line>`` of this process."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"


@contextlib.contextmanager
def hold(path: str | Path, what: str, wait: float = 0.0) -> Iterator[Path]:
    """Hold the lock file ``path`` until the block ends; raise :class:`LockHeld` (a
    ValueError naming ``what`` and the holder) if another process holds it: at once, or after
    ``wait`` seconds of trying again (for locks held a moment, such as a file's update)."""
    path = Path(path)
    created = _make_parents(path.parent)
    try:
        if fcntl is None:
            with _hold_filelock(path, what, wait):
                yield path
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = _acquire(path, what)
                break
            except LockHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        try:
            yield path
        finally:
            # delete while still locked: a process that opened the old file before this
            # sees, once it gets the lock, that the path no longer leads to it (see _acquire)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)  # releases the lock
    finally:
        for folder in reversed(created):  # only those this call made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break


def _acquire(path: Path, what: str) -> int:
    for _ in range(100):
        try:
            # never O_TRUNC: opening must not wipe the line of the process holding the lock
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a releasing holder removed the folder it had created
            _make_parents(path.parent)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LockHeld(path, what, holder) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, (holder_line() + "\n").encode("utf-8"))
            return fd
        os.close(fd)  # its holder deleted it after we opened it: lock the current file
    raise OSError(f"cannot lock {path}: it keeps being replaced")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def _hold_filelock(path: Path, what: str, wait: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise LockHeld(path, what, "") from None
    try:
        yield
    finally:
        lock.release()


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for item in reversed(missing):
        try:
            item.mkdir()
            created.append(item)
        except FileExistsError:
            if not item.is_dir():
                raise
    return created
