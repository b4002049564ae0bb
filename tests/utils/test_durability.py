"""Write order on disk: what a rename publishes is fsynced before it, the folder after it.

A kill leaves whatever the process wrote, but a power cut keeps only what was fsynced, in any
order the disk likes. So every atomic writer must fsync the new file (or every file and folder
of the new folder) before renaming it into place, and the parent folder after the rename; a
metrics line must be fsynced before the checkpoint that follows it. These tests trace
``os.fsync`` and ``os.replace`` (paths from ``/proc/self/fd``, so Linux only).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rblora.federation.rundir import RunFolder
from rblora.utils.atomic import append_line, atomic_dir, make_dirs, write_text

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


@pytest.fixture
def trace(monkeypatch):
    """``[("fsync", path) | ("rename", src, dst)]`` in the order they happened."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        events.append(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def synced(events, until: int | None = None) -> set[str]:
    return {e[1] for e in events[:until] if e[0] == "fsync"}


def rename_to(events, dst: Path) -> int:
    """Index of the last rename onto ``dst``."""
    hits = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(dst.resolve())]
    assert hits, f"nothing renamed to {dst}"
    return hits[-1]


def test_atomic_dir_syncs_every_file_and_folder_before_the_rename(tmp_path, trace):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")  # as safetensors/PEFT write: no fsync
        (tmp / "config.json").write_text("{}")
    i = rename_to(trace, target)
    built = Path(trace[i][1])
    want = {built / "sub" / "weights.bin", built / "config.json", built / "sub", built}
    assert {str(p) for p in want} <= synced(trace, i)
    assert str(tmp_path.resolve()) in synced(trace[i + 1 :])


def test_replacing_a_folder_syncs_the_parent_after_the_renames(tmp_path, trace):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    i = rename_to(trace, target)
    assert str(tmp_path.resolve()) in synced(trace[i + 1 :])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_text_syncs_the_folder_after_the_rename(tmp_path, trace):
    path = tmp_path / "a" / "b" / "c.json"
    write_text(path, "{}")
    i = rename_to(trace, path)
    assert str(Path(trace[i][1])) in synced(trace, i)  # the temporary file, before
    assert str(path.parent.resolve()) in synced(trace[i + 1 :])  # its folder, after
    # the folders it created are durable in their parents
    assert {str(tmp_path.resolve()), str((tmp_path / "a").resolve())} <= synced(trace, i)


def test_make_dirs_syncs_each_new_folder_into_its_parent(tmp_path, trace):
    make_dirs(tmp_path / "x" / "y")
    assert synced(trace) == {str(tmp_path.resolve()), str((tmp_path / "x").resolve())}


def test_append_line_syncs_each_line(tmp_path, trace):
    path = tmp_path / "log.jsonl"
    append_line(path, "1")
    append_line(path, "2")
    fsyncs = [e[1] for e in trace]
    assert fsyncs.count(str(path.resolve())) == 2
    assert str(tmp_path.resolve()) in fsyncs  # the new file's name, once
    assert path.read_text() == "1\n2\n"


def test_run_folder_metrics_line_then_checkpoint(tmp_path, trace):
    """The round's metrics line is on disk before its checkpoint is renamed into place; the
    checkpoint's tensors before its manifest names their sha256; the folder after the rename."""
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.append_metrics({"type": "round", "round": 1})
    folder.save_checkpoint({"x": torch.ones(3)}, {"completed_rounds": 1})
    i = rename_to(trace, folder.path / "checkpoint")
    assert str(folder.metrics_path.resolve()) in synced(trace, i)
    built = Path(trace[i][1])
    manifest = rename_to(trace, built / "manifest.json")
    assert str(built / "server.safetensors") in synced(trace, manifest)
    assert {str(built / n) for n in ("server.safetensors", "state.json")} <= synced(trace, i)
    assert str(folder.path.resolve()) in synced(trace[i + 1 :])
    assert folder.load_checkpoint()[1] == {"completed_rounds": 1}
