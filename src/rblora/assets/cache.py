"""The asset cache: where assets live, their manifests, and atomic installation.

Layout: ``<cache_dir()>/<name>/`` holds the converted files plus ``manifest.json``::

    {"format": 1, "name": ..., "revision": ..., "source": {...pin...},
     "files": {"relative/path": {"size": int, "sha256": str, "mtime_ns": int}}}

A folder without a manifest, or whose manifest does not match the pinned source, is not an asset.
Checking a cached asset stays well under a second: files smaller than ``HASH_BELOW`` (128 MiB,
i.e. everything but the SmolLM2 weights) are re-hashed on every check (sha256 runs at about
0.6 GB/s here); larger files are re-hashed only when their size or mtime differs from the
manifest, or with ``full=True`` (``rblora assets fetch NAME --verify``). A new asset is
built in a temporary folder inside the cache and renamed into place only after its manifest was
written and checked, so an interrupted fetch never leaves a folder that looks valid.

Hidden entries of the cache root (see ``rblora.utils.atomic``): ``.<name>.lock``, the lock a
fetch holds while building ``<name>`` (empty, kept); ``.<name>.tmp-<pid>-*``, a fetch's work
folder; ``.<name>.old-<pid>-*``, the previous copy during its replacement. Leftovers of killed
fetches are recovered or deleted by the next fetch of that asset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rblora.utils.atomic import replace_dir, write_json

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20
HASH_BELOW = 128 << 20


def cache_dir() -> Path:
    """The cache root: ``$RBLORA_CACHE`` if set, else ``~/.cache/rblora`` (not created here)."""
    env = os.environ.get("RBLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rblora"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` via a temporary file and a rename."""
    write_json(path, obj, indent=1, sort_keys=True)


def write_manifest(folder: Path, name: str, revision: int, source: dict) -> dict:
    """Hash every file under ``folder`` and write its manifest; returns the manifest dict."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        size, mtime_ns = _stamp(path)
        files[rel] = {"size": size, "sha256": sha256_file(path), "mtime_ns": mtime_ns}
    manifest = {
        "format": FORMAT,
        "name": name,
        "revision": revision,
        "source": source,
        "files": files,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder``, or None if it is missing or unreadable."""
    try:
        with open(folder / MANIFEST, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


@dataclass(frozen=True)
class CacheCheck:
    """Outcome of checking a cached folder: ``ok`` or the reason it cannot be used."""

    ok: bool
    reason: str = ""


def check_folder(
    folder: Path,
    name: str,
    revision: int,
    source: dict,
    full: bool = False,
    hash_below: int | None = None,
) -> CacheCheck:
    """Check a cached asset folder against its manifest and the expected pin.

    Files smaller than ``hash_below`` bytes (default ``HASH_BELOW``) are always re-hashed. Larger
    files whose size and mtime match the manifest are trusted unless ``full``; one whose stamp
    changed is re-hashed and, if its content is still right, its new stamp is saved (so a copied
    cache costs one re-hash, not one per load).
    """
    if hash_below is None:
        hash_below = HASH_BELOW
    manifest = read_manifest(folder)
    if manifest is None:
        return CacheCheck(False, "no manifest" if folder.exists() else "not fetched")
    expected = {"name": name, "revision": revision, "source": source}
    for key, value in expected.items():
        if manifest.get(key) != value:
            return CacheCheck(False, f"manifest {key} is {manifest.get(key)!r}, expected {value!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(i, dict) and {"size", "sha256", "mtime_ns"} <= i.keys() for i in files.values()
    ):
        return CacheCheck(False, "malformed manifest")
    restamped = False
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file():
            return CacheCheck(False, f"missing file {rel}")
        size, mtime_ns = _stamp(path)
        if size != info["size"]:
            return CacheCheck(False, f"{rel} has {size} bytes, manifest says {info['size']}")
        if full or size < hash_below or mtime_ns != info["mtime_ns"]:
            if sha256_file(path) != info["sha256"]:
                return CacheCheck(False, f"{rel} does not match its sha256 in the manifest")
            if mtime_ns != info["mtime_ns"]:
                info["mtime_ns"] = mtime_ns
                restamped = True
    if restamped:
        # A read-only cache still works; it just re-hashes the file next time.
        with contextlib.suppress(OSError):
            write_json_atomic(folder / MANIFEST, manifest)
    return CacheCheck(True)


def install(built: Path, target: Path) -> None:
    """Move the finished folder ``built`` to ``target``, replacing an invalid old copy.

    Both must be on the same filesystem (``built`` lives in a temporary folder inside the cache).
    The old folder is first renamed aside, then deleted, so ``target`` is never half-written; a
    kill between the two renames is recovered by the next fetch (``rblora.utils.atomic``).
    """
    replace_dir(built, target)
