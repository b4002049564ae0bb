"""Read a folder written by ``prepare-data``, validating it, for the training loop.

``data_dir`` is the output root (``./data``); the folder read is ``data_dir/<num_clients>``, as in
the seed's ``train.py``. ``data_dir`` may also be that folder itself. Folders made by the seed's
own ``prepare_data.py`` (no ``partition.json``) are accepted for text data.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rblora.utils.atomic import recover

_LOCAL = re.compile(r"^local_training_(\d+)\.json$")


@dataclass
class FederatedData:
    """Client record lists and the held-out test set of a prepared text folder.

    Records are ``{"instruction", "context", "response", "category", ...}`` dicts; mixture
    records also carry ``task``, ``choices`` and ``answer``.
    """

    folder: Path
    clients: list[list[dict]]  # clients[k] = the records of client k
    global_test: list[dict]
    meta: dict | None  # partition.json, None for a folder made by the seed's script

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def resolve_folder(data_dir: Path | str, num_clients: int) -> Path:
    """``data_dir/<num_clients>`` (or ``data_dir`` itself when it is a prepared folder)."""
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    data_dir = Path(data_dir)
    folder = data_dir / str(num_clients)
    with contextlib.suppress(OSError):  # a read-only folder is read as it is
        recover(folder)  # prepare-data killed while replacing the folder: the old one comes back
    if folder.is_dir():
        return folder
    if (data_dir / "partition.json").is_file() or (data_dir / "local_training_0.json").is_file():
        return data_dir
    raise ValueError(
        f"no prepared data for {num_clients} clients: {folder} does not exist; run "
        f"`python prepare_data.py {num_clients} --output_dir {data_dir}` first"
    )


def _load_json(path: Path):
    if not path.is_file():
        raise ValueError(f"{path} is missing; the folder is incomplete, run prepare_data.py again")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _check_records(path: Path, value) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{path}: no records (every client and the test set need at least one)")
    for i, rec in enumerate(value):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
        for key, required in (("instruction", True), ("response", True), ("context", False)):
            if (required or rec.get(key) is not None) and not isinstance(rec.get(key), str):
                raise ValueError(
                    f"{path}: record {i}: field {key!r} must be a string, got {rec.get(key)!r}"
                )
    return value


def _read_meta(folder: Path, num_clients: int, kind: str) -> dict | None:
    path = folder / "partition.json"
    if not path.exists():
        return None
    meta = _load_json(path)
    if not isinstance(meta, dict) or "num_clients" not in meta:
        raise ValueError(f"{path}: expected an object with 'num_clients'")
    if meta["num_clients"] != num_clients:
        raise ValueError(
            f"{path} describes {meta['num_clients']} clients but {num_clients} were asked for; "
            f"use num_clients={meta['num_clients']} or prepare data for {num_clients} clients"
        )
    if meta.get("kind", "text") != kind:
        other = "load_federated_images" if kind == "text" else "load_federated_split"
        raise ValueError(f"{folder} holds {meta.get('kind')!r} data; read it with {other}")
    return meta


def _check_client_files(folder: Path, num_clients: int) -> None:
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _LOCAL.match(p.name)))
    missing = sorted(set(range(num_clients)) - set(found))
    if missing:
        raise ValueError(
            f"{folder}: local_training_{missing[0]}.json is missing ({len(found)} client files "
            f"for {num_clients} clients)"
        )
    extra = [k for k in found if k >= num_clients]
    if extra:
        raise ValueError(
            f"{folder} has client files up to local_training_{max(found)}.json but "
            f"num_clients is {num_clients}; the folder was prepared for another client count"
        )


def load_federated_split(data_dir: Path | str, num_clients: int) -> FederatedData:
    """Read and validate ``data_dir/<num_clients>``: every client's records and global_test.

    Raises ``ValueError`` naming the file and the problem: missing folder or file, client count
    mismatch, malformed JSON (with the line), records without string instruction/response.
    """
    folder = resolve_folder(data_dir, num_clients)
    meta = _read_meta(folder, num_clients, "text")
    _check_client_files(folder, num_clients)
    clients = []
    for k in range(num_clients):
        path = folder / f"local_training_{k}.json"
        clients.append(_check_records(path, _load_json(path)))
    if meta is not None and "client_sizes" in meta:
        sizes = [len(c) for c in clients]
        if sizes != meta["client_sizes"]:
            raise ValueError(
                f"{folder}: client files hold {sizes} records but partition.json says "
                f"{meta['client_sizes']}; the folder was modified, prepare it again"
            )
    path = folder / "global_test.json"
    return FederatedData(folder, clients, _check_records(path, _load_json(path)), meta)


# ----------------------------------------------------------------------------- images
@dataclass
class ImageSplit:
    """Images of one client (or of the test set) as tensors.

    ``images``: ``(n, H, W)`` uint8; ``labels``: ``(n,)`` int64; ``classes[label]`` is the name.
    """

    images: object  # torch.Tensor
    labels: object  # torch.Tensor
    classes: list[str]


@dataclass
class FederatedImages:
    folder: Path
    clients: list[ImageSplit]
    global_test: ImageSplit
    meta: dict


def _index_file(path: Path, source: str, split: str, size: int) -> np.ndarray:
    value = _load_json(path)
    if not isinstance(value, dict) or not isinstance(value.get("indices"), list):
        raise ValueError(f"{path}: expected an object with 'source', 'split' and 'indices'")
    if value.get("source") != source or value.get("split") != split:
        raise ValueError(
            f"{path}: indexes {value.get('source')!r}/{value.get('split')!r}, expected "
            f"{source!r}/{split!r}"
        )
    idx = np.asarray(value["indices"])
    if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{path}: 'indices' must be a non-empty list of integers")
    if idx.min() < 0 or idx.max() >= size:
        raise ValueError(f"{path}: indices must lie in 0..{size - 1} (the {split} split)")
    return idx.astype(np.int64)


def _open_images(data_dir: Path | str, num_clients: int):
    from rblora import assets

    folder = resolve_folder(data_dir, num_clients)
    meta = _read_meta(folder, num_clients, "images")
    if meta is None:
        raise ValueError(f"{folder / 'partition.json'} is missing; image folders need it")
    _check_client_files(folder, num_clients)
    return folder, meta, assets.load_images(meta["source"])


def _gather(folder: Path, meta: dict, data: dict, name: str, split: str) -> ImageSplit:
    import torch

    images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    idx = _index_file(folder / name, meta["source"], split, len(labels))
    return ImageSplit(
        torch.from_numpy(np.ascontiguousarray(images[idx])),
        torch.from_numpy(np.asarray(labels, dtype=np.int64)[idx]),
        [str(c) for c in data["classes"]],
    )


def load_federated_images(data_dir: Path | str, num_clients: int) -> FederatedImages:
    """Read ``data_dir/<num_clients>`` prepared from an image source (``--source fashion-mnist``
    or ``digits``) and gather the pixels from ``rblora.assets.load_images``."""
    folder, meta, data = _open_images(data_dir, num_clients)
    clients = [
        _gather(folder, meta, data, f"local_training_{k}.json", "train") for k in range(num_clients)
    ]
    test = _gather(folder, meta, data, "global_test.json", "test")
    return FederatedImages(folder, clients, test, meta)


def load_client_images(data_dir: Path | str, num_clients: int, k: int) -> ImageSplit:
    """Client ``k``'s images ``(n, H, W)`` uint8 and labels ``(n,)`` int64."""
    if not 0 <= k < num_clients:
        raise ValueError(f"client index {k} out of range 0..{num_clients - 1}")
    folder, meta, data = _open_images(data_dir, num_clients)
    return _gather(folder, meta, data, f"local_training_{k}.json", "train")


def load_test_images(data_dir: Path | str, num_clients: int) -> ImageSplit:
    """The held-out test images of a prepared image folder."""
    folder, meta, data = _open_images(data_dir, num_clients)
    return _gather(folder, meta, data, "global_test.json", "test")


def data_fingerprint(data_dir: Path | str, num_clients: int) -> dict[str, str]:
    """sha256 of every JSON file of the prepared folder (clients, test set, partition), so a run
    can tell that its data was prepared again in place."""
    from rblora.utils.files import sha256_file

    folder = resolve_folder(data_dir, num_clients)
    return {path.name: sha256_file(path) for path in sorted(folder.glob("*.json"))}
