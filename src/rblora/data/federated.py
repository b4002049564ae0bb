"""Read a folder written by ``prepare-data``, validating it, for the training loop.

``data_dir`` is the output root (``./data``); the folder read is ``data_dir/<num_clients>``, as in
the seed's ``train.py``. ``data_dir`` may also be that folder itself. Folders made by the seed's
own ``prepare_data.py`` (no ``partition.json``) are accepted for text data.

Who reads what (DESIGN.md section 6): one process holding every client (the in-process engine)
reads the whole folder (:func:`load_federated_split`, :func:`load_federated_images`); a Flower
node reads only its own client's file (:func:`load_client_records`, :func:`load_client_images`),
and a Flower server only the run's metadata and test set (:func:`read_partition`,
:func:`load_test_records`, :func:`load_test_images`), never a client's training records.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rblora.utils.records import read_json

if TYPE_CHECKING:
    import torch

from rblora.utils.atomic import recover

#: A client's file: ``local_training_<k>.json``.
CLIENT_FILE = re.compile(r"^local_training_(\d+)\.json$")
#: A client's own held-out split (``prepare-data --local_test_frac``): ``local_test_<k>.json``.
LOCAL_TEST_FILE = re.compile(r"^local_test_(\d+)\.json$")
#: What a run with --eval_personalized says when the folder has no local test splits.
LOCAL_TEST_ADVICE = (
    "prepare the data with --local_test_frac (e.g. `python prepare_data.py K --local_test_frac "
    "0.2`), which holds out part of every client's data as local_test_<k>.json"
)


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
    """``data_dir/<num_clients>`` (or ``data_dir`` itself when it is a prepared folder, or a
    part of one: a node's folder may hold only its own ``local_training_<k>.json``)."""
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    data_dir = Path(data_dir)
    folder = data_dir / str(num_clients)
    with contextlib.suppress(OSError):  # a read-only folder is read as it is
        recover(folder)  # prepare-data killed while replacing the folder: the old one comes back
    if folder.is_dir():
        return folder
    with contextlib.suppress(OSError):
        names = {p.name for p in data_dir.iterdir()}
        if names & {"partition.json", "global_test.json"} or any(map(CLIENT_FILE.match, names)):
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


def read_partition(data_dir: Path | str, num_clients: int, kind: str | None = None) -> dict | None:
    """``partition.json`` of the prepared folder (the run's metadata: kind, client sizes, class
    names), checked against ``num_clients`` and ``kind`` ("text" | "images", None: either); None
    if the folder has none (made by the seed's script, or a node's folder with only its file)."""
    return _read_meta(resolve_folder(data_dir, num_clients), num_clients, kind)


def _read_meta(folder: Path, num_clients: int, kind: str | None) -> dict | None:
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
    if kind is not None and meta.get("kind", "text") != kind:
        found, task = ("images", "image") if kind == "text" else ("text records", "lm")
        raise ValueError(
            f"{folder} holds {found} (partition.json kind {meta.get('kind')!r}), not the "
            f"{'text records' if kind == 'text' else 'images'} this task trains on; a run on "
            f"this folder needs --task {task}"
        )
    sizes = meta.get("client_sizes")
    if sizes is not None and (
        not isinstance(sizes, list)
        or len(sizes) != num_clients
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)
    ):
        raise ValueError(f"{path}: 'client_sizes' must be {num_clients} counts, got {sizes!r}")
    return meta


def _check_client_size(meta: dict | None, k: int, size: int, path: Path) -> None:
    """The client file holds as many examples as partition.json says it does."""
    if (
        meta is not None
        and meta.get("client_sizes") is not None
        and meta["client_sizes"][k] != size
    ):
        raise ValueError(
            f"{path} holds {size} examples but partition.json says {meta['client_sizes'][k]}; "
            "the folder was modified, prepare it again"
        )


def _check_client(k: int, num_clients: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_clients:
        raise ValueError(f"client {k!r} is out of range: valid are 0..{num_clients - 1}")


def _check_client_files(folder: Path, num_clients: int) -> None:
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := CLIENT_FILE.match(p.name)))
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
    clients = [_client_records(folder, meta, k) for k in range(num_clients)]
    path = folder / "global_test.json"
    return FederatedData(folder, clients, _check_records(path, _load_json(path)), meta)


def _client_records(folder: Path, meta: dict | None, k: int) -> list[dict]:
    path = folder / f"local_training_{k}.json"
    records = _check_records(path, _load_json(path))
    _check_client_size(meta, k, len(records), path)
    return records


def load_client_records(data_dir: Path | str, num_clients: int, k: int) -> list[dict]:
    """Client ``k``'s records alone (``local_training_<k>.json``), validated, and checked against
    ``partition.json`` when the folder has one: what a Flower node reads."""
    _check_client(k, num_clients)
    folder = resolve_folder(data_dir, num_clients)
    return _client_records(folder, _read_meta(folder, num_clients, "text"), k)


def local_test_size(folder: Path, meta: dict | None, k: int) -> int:
    """How many examples client ``k`` holds out for its personalised evaluation: partition.json's
    ``local_test_sizes[k]`` (0: none), or without partition.json (a node's folder) the size of
    its ``local_test_<k>.json``. ValueError naming the folder and ``prepare-data``'s option
    when the folder has no local test splits at all."""
    if meta is not None:
        sizes = meta.get("local_test_sizes")
        if sizes is None:
            raise ValueError(f"{folder} has no local test splits; {LOCAL_TEST_ADVICE}")
        if not isinstance(sizes, list) or not 0 <= k < len(sizes) or not isinstance(sizes[k], int):
            raise ValueError(f"{folder / 'partition.json'}: bad 'local_test_sizes' {sizes!r}")
        return int(sizes[k])
    path = folder / f"local_test_{k}.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing; {LOCAL_TEST_ADVICE}")
    return -1  # present, size unknown until read


def check_local_tests(data_dir: Path | str, num_clients: int, clients: list[int]) -> None:
    """Before round 1 of a run with ``--eval_personalized``: the folder has local test splits
    (partition.json's ``local_test_sizes``, or without it each held client's
    ``local_test_<k>.json``); one ValueError naming ``prepare-data``'s option otherwise. Reads
    no client file when the folder has partition.json."""
    folder = resolve_folder(data_dir, num_clients)
    meta = _read_meta(folder, num_clients, None)
    for k in clients if meta is None else [0]:
        local_test_size(folder, meta, k)


def _check_local_test(path: Path, expected: int, size: int) -> None:
    if expected >= 0 and size != expected:
        raise ValueError(
            f"{path} holds {size} examples but partition.json says {expected}; the folder was "
            "modified, prepare it again"
        )


def load_local_test_records(data_dir: Path | str, num_clients: int, k: int) -> list[dict]:
    """Client ``k``'s own held-out records (``local_test_<k>.json``), validated; [] when it holds
    none out (too small to spare one). Read when it is scored, never kept: a run of 10,000
    clients reads only the files of the clients it scores."""
    _check_client(k, num_clients)
    folder = resolve_folder(data_dir, num_clients)
    expected = local_test_size(folder, _read_meta(folder, num_clients, "text"), k)
    if expected == 0:
        return []
    path = folder / f"local_test_{k}.json"
    records = _check_records(path, _load_json(path))
    _check_local_test(path, expected, len(records))
    return records


def load_test_records(data_dir: Path | str, num_clients: int) -> list[dict]:
    """The held-out records (``global_test.json``) alone: what a Flower server reads."""
    folder = resolve_folder(data_dir, num_clients)
    _read_meta(folder, num_clients, "text")
    path = folder / "global_test.json"
    return _check_records(path, _load_json(path))


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

    from rblora.data.imagefiles import decode_image

    rgb = decode_image(path)  # ValueError naming a file damaged since preparation
    return _resize_crop(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None], size)[0]


@dataclass
class FederatedImages:
    folder: Path
    clients: list[ImageSplit]
    global_test: ImageSplit
    meta: dict


def _read_index(path: Path) -> dict:
    """An index file ``{"source", "split", "indices"}`` (structure checked, not yet the indices)."""
    value = _load_json(path)
    if not isinstance(value, dict) or not isinstance(value.get("indices"), list):
        raise ValueError(f"{path}: expected an object with 'source', 'split' and 'indices'")
    if not isinstance(value.get("source"), str) or value.get("split") not in ("train", "test"):
        raise ValueError(
            f"{path}: indexes {value.get('source')!r}/{value.get('split')!r}, expected an image "
            "source and the train or test split"
        )
    return value


def _indices(path: Path, index: dict, split: str | None, sizes: dict[str, int]) -> np.ndarray:
    """The checked indices of ``index``; ``split`` None accepts either split (a test set carved
    out of the training pool indexes "train")."""
    if split is not None and index["split"] != split:
        raise ValueError(f"{path}: indexes the {index['split']!r} split, expected {split!r}")
    idx = np.asarray(index["indices"])
    if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{path}: 'indices' must be a non-empty list of integers")
    size = sizes.get(index["split"], 0)
    if idx.min() < 0 or idx.max() >= size:
        raise ValueError(f"{path}: indices must lie in 0..{size - 1} (the {index['split']} split)")
    return idx.astype(np.int64)


def _image_source(folder: Path, source: str) -> dict:
    """``<split>_images``/``<split>_labels`` and ``classes`` of an image source: an embedded set
    (the whole set, from ``rblora.assets``) or an image folder (``image_files.json``: the file
    list, both splits, decoded on demand)."""
    if source != "imagefolder":
        from rblora import assets

        return assets.load_images(source)
    path = folder / "image_files.json"
    listing = _load_json(path)
    if not isinstance(listing, dict) or not {"root", "files", "labels", "classes"} <= set(listing):
        raise ValueError(f"{path}: expected an object with root, files, labels and classes")
    root = Path(listing["root"])
    if not root.is_dir():
        raise ValueError(f"{path}: the image folder {root} it lists no longer exists")
    paths = [root / rel for rel in listing["files"]]
    labels = np.asarray(listing["labels"], dtype=np.int64)
    return {"train_images": paths, "train_labels": labels, "classes": listing["classes"]}


class _ImageFolderReader:
    """Reads index files of one prepared image folder against their image source (loaded once)."""

    def __init__(self, data_dir: Path | str, num_clients: int):
        self.folder = resolve_folder(data_dir, num_clients)
        self.meta = _read_meta(self.folder, num_clients, "images")
        self._sources: dict[str, dict] = {}

    def split(self, name: str, split: str | None) -> ImageSplit:
        import torch

        path = self.folder / name
        index = _read_index(path)
        source = index["source"]
        if self.meta is not None and source != self.meta.get("source"):
            raise ValueError(
                f"{path}: indexes {source!r} but partition.json says {self.meta.get('source')!r}"
            )
        if source not in self._sources:
            self._sources[source] = _image_source(self.folder, source)
        data = self._sources[source]
        sizes = {s: len(data[f"{s}_labels"]) for s in ("train", "test") if f"{s}_labels" in data}
        idx = _indices(path, index, split, sizes)
        images, labels = data[f"{index['split']}_images"], data[f"{index['split']}_labels"]
        picked = [images[i] for i in idx] if isinstance(images, list) else images[idx]
        classes = (self.meta or {}).get("categories") or data["classes"]
        return ImageSplit(
            picked if isinstance(picked, list) else torch.from_numpy(np.ascontiguousarray(picked)),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)[idx]),
            [str(c) for c in classes],
        )

    def classes(self) -> list[str]:
        """The class names: ``partition.json``'s categories, else the image source's own."""
        if self.meta is not None and self.meta.get("categories"):
            return [str(c) for c in self.meta["categories"]]
        test = self.split("global_test.json", None)
        return list(test.classes)

    def local_test(self, k: int) -> ImageSplit | None:
        """Client ``k``'s own held-out images (``local_test_<k>.json``), read now; None when it
        holds none out. ValueError when the folder has no local test splits."""
        expected = local_test_size(self.folder, self.meta, k)
        if expected == 0:
            return None
        path = self.folder / f"local_test_{k}.json"
        split = self.split(path.name, "train")
        _check_local_test(path, expected, len(split))
        return split

    def client(self, k: int) -> ImageSplit:
        path = self.folder / f"local_training_{k}.json"
        split = self.split(path.name, "train")
        _check_client_size(self.meta, k, len(split), path)
        return split


class ClientImages(Mapping):
    """The images of the clients a process holds, read on demand: ``images[k]`` reads client
    ``k``'s index file (and checks it against ``partition.json``) when asked, and keeps nothing.
    ``sizes`` (client -> examples) and ``classes`` need no client file when the folder has a
    ``partition.json``. Built by :func:`open_client_images`."""

    def __init__(self, reader: _ImageFolderReader, sizes: dict[int, int], classes: list[str]):
        self._reader = reader
        self.sizes = dict(sizes)
        self.classes = list(classes)

    def __getitem__(self, k: int) -> ImageSplit:
        if k not in self.sizes:
            raise KeyError(k)
        return self._reader.client(k)

    def __iter__(self):
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)


def open_client_images(
    data_dir: Path | str, num_clients: int, clients: list[int]
) -> tuple[ClientImages, _ImageFolderReader]:
    """The images of ``clients`` of a prepared image folder, read when each is asked for (see
    :class:`ClientImages`), and the folder's reader (``reader.split("global_test.json",
    None)`` is the test set). A run that trains ~1,000 of 10,000 clients a round reads the files
    of those it trains, not 10,000 at start-up. Holding every client (the in-process engine)
    needs ``partition.json`` and every client file present (listed, not read; a damaged file
    shows when its client first trains), as :func:`load_federated_images` does. Holding some
    clients (a Flower node), their files are read once here, checked and counted."""
    for k in clients:
        _check_client(k, num_clients)
    reader = _ImageFolderReader(data_dir, num_clients)
    if sorted(clients) == list(range(num_clients)):
        if reader.meta is None:
            missing = reader.folder / "partition.json"
            raise ValueError(f"{missing} is missing; image folders need it")
        _check_client_files(reader.folder, num_clients)
    known = (reader.meta or {}).get("client_sizes")
    if known is not None and sorted(clients) == list(range(num_clients)):
        sizes = {k: int(known[k]) for k in clients}
        classes = (reader.meta or {}).get("categories")
    else:  # a node: its own file is read now, so a problem with it shows before round 1
        splits = {k: reader.client(k) for k in clients}
        sizes = {k: len(split) for k, split in splits.items()}
        classes = next(iter(splits.values())).classes if splits else None
    if not classes:
        classes = reader.classes()
    return ClientImages(reader, sizes, [str(c) for c in classes]), reader


def load_federated_images(data_dir: Path | str, num_clients: int) -> FederatedImages:
    """Read ``data_dir/<num_clients>`` prepared from an image source (``--source fashion-mnist``,
    ``digits`` or ``imagefolder``); the pixels come from ``rblora.assets.load_images`` or, for
    an image folder, are decoded on demand (:meth:`ImageSplit.pixels`)."""
    reader = _ImageFolderReader(data_dir, num_clients)
    if reader.meta is None:
        raise ValueError(f"{reader.folder / 'partition.json'} is missing; image folders need it")
    _check_client_files(reader.folder, num_clients)
    clients = [reader.client(k) for k in range(num_clients)]
    return FederatedImages(
        reader.folder, clients, reader.split("global_test.json", None), reader.meta
    )


def load_client_images(data_dir: Path | str, num_clients: int, k: int) -> ImageSplit:
    """Client ``k``'s images and labels ``(n,)`` int64 from its index file alone (the image
    source it names, and partition.json when the folder has one): what a Flower node reads.
    Class names come from partition.json, else from the source (an image folder's
    ``image_files.json``, an embedded set's own list)."""
    _check_client(k, num_clients)
    return _ImageFolderReader(data_dir, num_clients).client(k)


def load_test_images(data_dir: Path | str, num_clients: int) -> ImageSplit:
    """The held-out test images of a prepared image folder (``global_test.json``)."""
    return _ImageFolderReader(data_dir, num_clients).split("global_test.json", None)


def data_fingerprint(data_dir: Path | str, num_clients: int) -> dict[str, str]:
    """sha256 of the JSON files of the prepared folder (clients, test set, partition), so a run
    can tell that its data was prepared again in place.

    A folder whose ``partition.json`` records ``client_files_sha256`` (one digest of every
    client file, written by ``prepare-data`` since it prepares 10,000 clients) is fingerprinted
    without its client files: that digest is part of ``partition.json``'s hash, and a run
    starting on 10,000 clients reads none of their files. Older folders: every file.
    """
    from rblora.utils.files import sha256_file

    folder = resolve_folder(data_dir, num_clients)
    meta = _read_meta(folder, num_clients, None)
    skip_clients = isinstance(meta, dict) and isinstance(meta.get("client_files_sha256"), str)
    return {
        path.name: sha256_file(path)
        for path in sorted(folder.glob("*.json"))
        if not (skip_clients and (CLIENT_FILE.match(path.name) or LOCAL_TEST_FILE.match(path.name)))
    }
