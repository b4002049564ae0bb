"""Read a folder written by ``prepare-data``, validating it, for the training loop.

``data_dir`` is the output root (``./data``); the folder read is ``data_dir/<num_clients>``, as in
the seed's ``train.py``. ``data_dir`` may also be that folder itself. Folders made by the seed's
own ``prepare_data.py`` (no ``partition.json``) are accepted for text data.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rblora.utils.records import read_json

if TYPE_CHECKING:
    import torch

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
    return read_json(path)


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
        found, task = ("images", "image") if kind == "text" else ("text records", "lm")
        raise ValueError(
            f"{folder} holds {found} (partition.json kind {meta.get('kind')!r}), not the "
            f"{'text records' if kind == 'text' else 'images'} this task trains on; a run on "
            f"this folder needs --task {task}"
        )
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
    """Images of one client (or of the test set).

    ``images``: a ``(n, H, W)`` or ``(n, H, W, 3)`` uint8 tensor (embedded sets), or ``n`` image
    file paths (an image folder; decoded by :meth:`pixels`); ``labels``: ``(n,)`` int64;
    ``classes[label]`` is the name.
    """

    images: object  # torch.Tensor, or list[Path]
    labels: object  # torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, size: int) -> torch.Tensor:
        """``(n, C, size, size)`` uint8, C = 1 (grey) or 3 (RGB): resized so the shorter side is
        ``size`` (bicubic, antialiased), then centre-cropped to a square."""
        import torch

        if isinstance(self.images, list):
            if not self.images:
                return torch.empty((0, 3, size, size), dtype=torch.uint8)
            return torch.stack([_load_file(p, size) for p in self.images])
        x = self.images
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return _resize_crop(x, size)


def _resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, C, H, W)`` uint8 -> ``(n, C, size, size)`` uint8 (shorter side to ``size``, centre
    crop), in float32 chunks to bound memory."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    for s in range(0, x.shape[0], 512):
        chunk = x[s : s + 512].float()
        if new != (h, w):
            chunk = F.interpolate(chunk, size=new, mode="bicubic", antialias=True)
        chunk = chunk[..., top : top + size, left : left + size]
        out[s : s + 512] = chunk.round().clamp(0, 255).to(torch.uint8)
    return out


def _load_file(path: Path, size: int) -> torch.Tensor:
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return _resize_crop(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None], size)[0]


@dataclass
class FederatedImages:
    folder: Path
    clients: list[ImageSplit]
    global_test: ImageSplit
    meta: dict


def _index_file(
    path: Path, source: str, split: str | None, sizes: dict[str, int]
) -> tuple[np.ndarray, str]:
    """(indices, split) of an index file ``{"source", "split", "indices"}``; ``split`` None
    accepts either split (a test set carved out of the training pool indexes "train")."""
    value = _load_json(path)
    if not isinstance(value, dict) or not isinstance(value.get("indices"), list):
        raise ValueError(f"{path}: expected an object with 'source', 'split' and 'indices'")
    if value.get("source") != source or value.get("split") not in ("train", "test"):
        raise ValueError(
            f"{path}: indexes {value.get('source')!r}/{value.get('split')!r}, expected "
            f"{source!r}/train or test"
        )
    if split is not None and value["split"] != split:
        raise ValueError(f"{path}: indexes the {value['split']!r} split, expected {split!r}")
    idx = np.asarray(value["indices"])
    if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{path}: 'indices' must be a non-empty list of integers")
    size = sizes.get(value["split"], 0)
    if idx.min() < 0 or idx.max() >= size:
        raise ValueError(f"{path}: indices must lie in 0..{size - 1} (the {value['split']} split)")
    return idx.astype(np.int64), value["split"]


def _open_images(data_dir: Path | str, num_clients: int):
    """(folder, meta, data): ``data`` maps ``<split>_images``/``<split>_labels`` and ``classes``
    (for an image folder, the images are file paths and both splits are the file list)."""
    folder = resolve_folder(data_dir, num_clients)
    meta = _read_meta(folder, num_clients, "images")
    if meta is None:
        raise ValueError(f"{folder / 'partition.json'} is missing; image folders need it")
    _check_client_files(folder, num_clients)
    if meta["source"] != "imagefolder":
        from rblora import assets

        return folder, meta, assets.load_images(meta["source"])
    listing = _load_json(folder / "image_files.json")
    root = Path(listing["root"])
    if not root.is_dir():
        raise ValueError(
            f"{folder / 'image_files.json'}: the image folder {root} it lists no longer exists"
        )
    paths = [root / rel for rel in listing["files"]]
    labels = np.asarray(listing["labels"], dtype=np.int64)
    data = {"train_images": paths, "train_labels": labels, "classes": listing["classes"]}
    return folder, meta, data


def _gather(folder: Path, meta: dict, data: dict, name: str, split: str | None) -> ImageSplit:
    import torch

    sizes = {s: len(data[f"{s}_labels"]) for s in ("train", "test") if f"{s}_labels" in data}
    idx, split = _index_file(folder / name, meta["source"], split, sizes)
    images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    picked = [images[i] for i in idx] if isinstance(images, list) else images[idx]
    return ImageSplit(
        picked if isinstance(picked, list) else torch.from_numpy(np.ascontiguousarray(picked)),
        torch.from_numpy(np.asarray(labels, dtype=np.int64)[idx]),
        [str(c) for c in data["classes"]],
    )


def load_federated_images(data_dir: Path | str, num_clients: int) -> FederatedImages:
    """Read ``data_dir/<num_clients>`` prepared from an image source (``--source fashion-mnist``,
    ``digits`` or ``imagefolder``); the pixels come from ``rblora.assets.load_images`` or, for
    an image folder, are decoded on demand (:meth:`ImageSplit.pixels`)."""
    folder, meta, data = _open_images(data_dir, num_clients)
    clients = [
        _gather(folder, meta, data, f"local_training_{k}.json", "train") for k in range(num_clients)
    ]
    test = _gather(folder, meta, data, "global_test.json", None)
    return FederatedImages(folder, clients, test, meta)


def load_client_images(data_dir: Path | str, num_clients: int, k: int) -> ImageSplit:
    """Client ``k``'s images and labels ``(n,)`` int64."""
    if not 0 <= k < num_clients:
        raise ValueError(f"client index {k} out of range 0..{num_clients - 1}")
    folder, meta, data = _open_images(data_dir, num_clients)
    return _gather(folder, meta, data, f"local_training_{k}.json", "train")


def load_test_images(data_dir: Path | str, num_clients: int) -> ImageSplit:
    """The held-out test images of a prepared image folder."""
    folder, meta, data = _open_images(data_dir, num_clients)
    return _gather(folder, meta, data, "global_test.json", None)


def data_fingerprint(data_dir: Path | str, num_clients: int) -> dict[str, str]:
    """sha256 of every JSON file of the prepared folder (clients, test set, partition), so a run
    can tell that its data was prepared again in place."""
    from rblora.utils.files import sha256_file

    folder = resolve_folder(data_dir, num_clients)
    return {path.name: sha256_file(path) for path in sorted(folder.glob("*.json"))}
