"""Manifest, corruption detection and atomic install, on a fake builtin asset (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rblora.assets import AssetError, cache, cli, fetch, registry
from rblora.assets.registry import Asset
from rblora.assets.sources import Source

PIN = Source("builtin", "fake", "1").pin()


def _write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def test_manifest_records_sha256_and_size(tmp_path):
    _write(tmp_path / "a", {"x.txt": "hello", "sub/y.txt": "world!"})
    manifest = cache.write_manifest(tmp_path / "a", "a", 1, PIN)
    assert set(manifest["files"]) == {"x.txt", "sub/y.txt"}
    assert manifest["files"]["x.txt"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert manifest["files"]["sub/y.txt"]["size"] == 6
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest
    assert cache.check_folder(tmp_path / "a", "a", 1, PIN).ok


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: (f / "x.txt").write_text("hellO"), "sha256"),  # same size, new mtime
        (lambda f: (f / "x.txt").write_text("hell"), "bytes"),
        (lambda f: (f / "x.txt").unlink(), "missing"),
        (lambda f: (f / "manifest.json").unlink(), "no manifest"),
    ],
)
def test_damaged_folder_is_rejected(tmp_path, damage, reason):
    folder = tmp_path / "a"
    _write(folder, {"x.txt": "hello"})
    cache.write_manifest(folder, "a", 1, PIN)
    damage(folder)
    check = cache.check_folder(folder, "a", 1, PIN)
    assert not check.ok and reason in check.reason


def test_small_files_are_always_hashed(tmp_path):
    folder = tmp_path / "a"
    _write(folder, {"x.txt": "hello"})
    cache.write_manifest(folder, "a", 1, PIN)
    st = (folder / "x.txt").stat()
    (folder / "x.txt").write_text("jello")
    os.utime(folder / "x.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "sha256" in cache.check_folder(folder, "a", 1, PIN).reason


def test_large_file_same_stamp_corruption_needs_full_check(tmp_path):
    folder = tmp_path / "a"
    _write(folder, {"x.txt": "hello"})
    cache.write_manifest(folder, "a", 1, PIN)
    st = (folder / "x.txt").stat()
    (folder / "x.txt").write_text("jello")
    os.utime(folder / "x.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.check_folder(folder, "a", 1, PIN, hash_below=0).ok  # documented fast path
    assert not cache.check_folder(folder, "a", 1, PIN, full=True, hash_below=0).ok


def test_touched_but_intact_file_is_restamped(tmp_path):
    folder = tmp_path / "a"
    _write(folder, {"x.txt": "hello"})
    cache.write_manifest(folder, "a", 1, PIN)
    os.utime(folder / "x.txt", ns=(1, 1_000_000_000))
    assert cache.check_folder(folder, "a", 1, PIN, hash_below=0).ok
    assert cache.read_manifest(folder)["files"]["x.txt"]["mtime_ns"] == 1_000_000_000


def test_other_pin_or_revision_is_stale(tmp_path):
    _write(tmp_path / "a", {"x.txt": "hello"})
    cache.write_manifest(tmp_path / "a", "a", 1, PIN)
    assert "revision" in cache.check_folder(tmp_path / "a", "a", 2, PIN).reason
    other = Source("builtin", "fake", "2").pin()
    assert "source" in cache.check_folder(tmp_path / "a", "a", 1, other).reason


def test_install_replaces_old_folder(tmp_path):
    _write(tmp_path / "new", {"x.txt": "new"})
    _write(tmp_path / "target", {"x.txt": "old", "stale.txt": "s"})
    cache.install(tmp_path / "new", tmp_path / "target")
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["x.txt"]
    assert (tmp_path / "target" / "x.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


class _Builder:
    """A converter that counts its calls and can be told to fail half-way."""

    def __init__(self):
        self.calls = 0
        self.fail = False

    def __call__(self, download, out, progress):
        self.calls += 1
        (out / "data.txt").write_text(f"build {self.calls}")
        if self.fail:
            raise RuntimeError("interrupted")


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    monkeypatch.setenv("RBLORA_CACHE", str(tmp_path / "cache"))
    builder = _Builder()
    asset = Asset("fake", Source("builtin", "fake", "1"), builder, "a fake asset")
    monkeypatch.setitem(registry.ASSETS, "fake", asset)
    return builder


def test_fetch_builds_once_then_hits_cache(fake_asset, tmp_path):
    folder = fetch("fake", progress=False)
    assert folder == tmp_path / "cache" / "fake"
    assert fetch("fake", progress=False) == folder
    assert fake_asset.calls == 1
    assert (folder / "data.txt").read_text() == "build 1"


def test_corrupted_cached_file_is_rebuilt_not_used(fake_asset, capsys):
    folder = fetch("fake", progress=False)
    (folder / "data.txt").write_text("build X")  # same size, different content
    assert (fetch("fake", progress=False) / "data.txt").read_text() == "build 2"
    assert "re-fetching" in capsys.readouterr().err


def test_interrupted_build_leaves_nothing_that_looks_valid(fake_asset, tmp_path):
    fake_asset.fail = True
    with pytest.raises(AssetError, match="interrupted"):
        fetch("fake", progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".fake.lock"]  # no temporary
    fake_asset.fail = False
    assert (fetch("fake", progress=False) / "data.txt").read_text() == "build 2"


def test_verify_rebuild_replaces_a_corrupt_large_file(fake_asset, monkeypatch, capsys):
    """`rblora assets fetch NAME --verify` on a large file corrupted in place, size and mtime kept:
    the cheap check still passes it (documented), the verified rebuild must replace it."""
    monkeypatch.setattr(cache, "HASH_BELOW", 0)  # data.txt counts as large (checked by stamp)
    folder = fetch("fake", progress=False)
    path = folder / "data.txt"
    st = path.stat()
    path.write_text("build X")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (fetch("fake", progress=False) / "data.txt").read_text() == "build X"
    assert cli.main(["fetch", "fake", "--verify", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "does not match its sha256" in err and "re-fetching" in err
    assert out.strip().splitlines()[-1] == str(folder)
    assert path.read_text() == "build 2"
    assert fake_asset.calls == 2
    assert registry.check("fake", full=True).ok


def dead_pid() -> int:
    """The id of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_fetch_killed_while_replacing_keeps_the_old_copy(fake_asset, tmp_path):
    folder = fetch("fake", progress=False)
    pid = dead_pid()  # what a kill between the two renames of a re-fetch leaves behind:
    os.replace(folder, tmp_path / "cache" / f".fake.old-{pid}-0123456789ab")
    (tmp_path / "cache" / f".fake.tmp-{pid}-ba9876543210").mkdir()
    assert fetch("fake", progress=False) == folder
    assert fake_asset.calls == 1  # put back, not rebuilt
    assert (folder / "data.txt").read_text() == "build 1"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".fake.lock", "fake"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="smollm2-135m-instruct.*digits"):
        fetch("nope")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RBLORA_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path
    monkeypatch.delenv("RBLORA_CACHE")
    assert cache.cache_dir().parts[-2:] == (".cache", "rblora")


def test_malformed_manifest_is_rejected(tmp_path):
    _write(tmp_path / "a", {"x.txt": "hello"})
    cache.write_manifest(tmp_path / "a", "a", 1, PIN)
    manifest = cache.read_manifest(tmp_path / "a")
    manifest["files"]["x.txt"] = "oops"
    cache.write_json_atomic(tmp_path / "a" / "manifest.json", manifest)
    assert cache.check_folder(tmp_path / "a", "a", 1, PIN).reason == "malformed manifest"


def test_concurrent_fetches_build_once(fake_asset, tmp_path, capsys, monkeypatch):
    """The second fetch waits for the first one's lock, then uses what it built."""
    entered, go = threading.Event(), threading.Event()
    build = fake_asset.__call__

    def slow_first_build(download, out, progress):
        if fake_asset.calls == 0:
            entered.set()
            assert go.wait(30)
        build(download, out, progress)

    asset = registry.ASSETS["fake"]
    monkeypatch.setitem(
        registry.ASSETS, "fake", Asset("fake", asset.source, slow_first_build, asset.description)
    )
    results = []
    first = threading.Thread(target=lambda: results.append(fetch("fake", progress=False)))
    first.start()
    assert entered.wait(30)  # the first fetch holds the lock and is building
    second = threading.Thread(target=lambda: results.append(fetch("fake", progress=False)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the lock, not building a second copy
    go.set()
    first.join(30)
    second.join(30)
    assert results == [tmp_path / "cache" / "fake"] * 2
    assert fake_asset.calls == 1
    assert (results[0] / "data.txt").read_text() == "build 1"
    assert "waiting for another process fetching fake" in capsys.readouterr().err


#: A fetch of a fake asset whose converter is SIGKILLed half-way (as a user's kill -9 would).
KILLED_FETCH = """
import os, signal
from rblora.assets import registry
from rblora.assets.registry import Asset
from rblora.assets.sources import Source
def build(download, out, progress):
    (out / "data.txt").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
registry.ASSETS["fake"] = Asset("fake", Source("builtin", "fake", "1"), build, "a fake asset")
registry.fetch("fake", progress=False)
"""


def test_temporary_of_a_killed_fetch_is_removed_by_the_next_fetch(fake_asset, tmp_path):
    src = Path(registry.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(src), "RBLORA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FETCH], env=env)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left[0] == ".fake.lock" and left[1].startswith(f".fake.tmp-{proc.pid}-")
    assert (fetch("fake", progress=False) / "data.txt").read_text() == "build 1"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".fake.lock", "fake"]


@pytest.mark.parametrize("cached", [False, True], ids=["missing", "cached"])
def test_leftover_temporaries_are_removed_by_the_next_fetch(fake_asset, tmp_path, cached):
    cache_root = tmp_path / "cache"
    if cached:
        fetch("fake", progress=False)
    leftovers = [
        ".tmp-fake-k3j_x9a2",  # a work folder of versions before the lock (no pid in its name)
        f".fake.tmp-{os.getppid()}-0123456789ab",  # a pid now used by another process
        f".fake.old-{os.getpid()}-0123456789ab",
    ]
    for name in leftovers:
        (cache_root / name).mkdir(parents=True)
        (cache_root / name / "big.bin").write_bytes(b"x" * 1000)
    (cache_root / ".tmp-fakeother-k3j_x9a2").mkdir()  # another asset's: not touched
    (cache_root / ".tmp-fake-other-k3j_x9a2").mkdir()
    fetch("fake", progress=False)
    assert fake_asset.calls == 1
    assert sorted(p.name for p in cache_root.iterdir()) == [
        ".fake.lock",
        ".tmp-fake-other-k3j_x9a2",
        ".tmp-fakeother-k3j_x9a2",
        "fake",
    ]


def test_unwritable_cache_is_one_asset_error(fake_asset, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(AssetError, match="fetching fake into the cache .* failed"):
        fetch("fake", progress=False)
