"""Small image classification sets, converted to ``.npy`` arrays plus ``classes.json``.

- fashion-mnist: Debian ``dataset-fashion-mnist`` (MIT), idx files under
  ``/usr/share/datasets/fashion-mnist/``; 60,000 train + 10,000 test images (28, 28).
- digits: scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 rescaled to 0..255 by
  ``round(v * 255 / 16)``). It has no official split: a stratified split drawn once with
  ``sklearn.model_selection.train_test_split(test_size=360, stratify=labels, random_state=0)``
  gives 1,437 train and 360 test images.

Files: ``{train,test}_images.npy`` uint8 (N, H, W), ``{train,test}_labels.npy`` int64 (N,).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from rblora.assets.sources import AssetError, deb_data_members

FASHION_PREFIX = "usr/share/datasets/fashion-mnist/"
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGITS_TEST = 360
DIGITS_SEED = 0
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode an (uncompressed) idx file of unsigned bytes: magic 0x0000_08_<ndim>, dims, data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise AssetError(f"not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise AssetError(f"idx file holds {data.size} bytes for shape {shape}")
    return data.reshape(shape)


def _save(out: Path, arrays: dict[str, np.ndarray], classes: list[str]) -> None:
    for key in ARRAYS:
        np.save(out / f"{key}.npy", arrays[key], allow_pickle=False)
    (out / "classes.json").write_text(json.dumps(classes) + "\n", encoding="utf-8")


def build_fashion_mnist(download: Path, out: Path, progress: bool) -> None:
    """Unpack the idx files from the .deb ``download`` into ``.npy`` arrays in ``out``."""
    files = deb_data_members(download, FASHION_PREFIX)
    stems = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    arrays = {}
    for key, stem in stems.items():
        if stem not in files:
            raise AssetError(f"{download.name} lacks {FASHION_PREFIX}{stem}")
        data = parse_idx(gzip.decompress(files[stem]))
        arrays[key] = data.astype(np.int64) if key.endswith("labels") else data
    _save(out, arrays, FASHION_CLASSES)


def build_digits(download: Path | None, out: Path, progress: bool) -> None:
    """Write scikit-learn's digits, split 1,437/360 (stratified, seed 0), into ``out``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=DIGITS_TEST, stratify=labels, random_state=DIGITS_SEED
    )
    arrays = {"train_images": tr_x, "train_labels": tr_y, "test_images": te_x, "test_labels": te_y}
    _save(out, arrays, [str(d) for d in range(10)])
