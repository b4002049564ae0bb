"""Manifest, corruption detection and atomic install, on a fake builtin asset (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

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
    assert list((tmp_path / "cache").iterdir()) == []
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
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake"]


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
