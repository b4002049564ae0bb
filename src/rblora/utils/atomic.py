"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Each writer fills a temporary sibling (same file system) and renames it into place, so a process
killed mid-write leaves at most a hidden ``.name.tmp-*`` leftover that no reader takes for a
result. Files and folders get the usual permissions (``mkstemp``/``mkdtemp`` would make them
private).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fresh_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(6)}"


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (fsync, then rename over any old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_name(path.parent, f".{path.name}.tmp-")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` with the usual permissions."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = _fresh_name(parent, prefix)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OSError(f"could not create a temporary folder in {parent}")


def replace_dir(built: Path, target: Path) -> None:
    """Move the finished folder ``built`` to ``target``, replacing any old ``target``.

    The old folder is renamed aside first and deleted only after the new one is in place; if the
    final rename fails, the old one is put back. Both must be on the same file system.
    """
    if not target.exists():
        os.replace(built, target)
        return
    old = _fresh_name(target.parent, f".{target.name}.old-")
    os.replace(target, old)
    try:
        os.replace(built, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (old content removed).

    On an exception the temporary folder is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
