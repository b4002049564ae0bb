"""The files of a user's image folder (``--source imagefolder``): decoded in full once at
preparation, so a broken file is named there rather than in the middle of training, and again
by the training loop when it reads the pixels.

PIL opens lazily (``Image.open`` reads the header only); ``convert("RGB")`` decodes every pixel,
so a file cut short fails here. ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays as it is (False by
default): a truncated image is an error, never silently padded.

Measured on the project's 2-core CPU (shared with other work), 2,000 files, half PNG and half
JPEG, median of 7 warm-cache runs: 32 px decode in 0.12 s sequentially, 0.13 s with 2 threads,
0.13 s with 2 processes; 224 px in 1.00 s, 0.99 s and 1.01 s. No pool gained, so decoding is
sequential (a first, cold-cache pass took about twice as long, reading the files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def decode_image(path: str | Path) -> np.ndarray:
    """Every pixel of an image file as ``(H, W, 3)`` uint8 RGB; ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
    except Exception as err:  # PIL's format plugins raise OSError, SyntaxError, EOFError,
        # struct.error, ValueError or DecompressionBombError on a damaged file
        raise ValueError(f"{path}: cannot decode the image ({err})") from None


def bad_images(root: Path, files: Sequence[str]) -> dict[str, str]:
    """``{relative path: reason}`` of the files under ``root`` that do not decode in full."""
    bad = {}
    for rel in files:
        try:
            decode_image(root / rel)
        except ValueError as err:
            bad[rel] = str(err).removeprefix(f"{root / rel}: ")
    return bad
