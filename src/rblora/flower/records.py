"""Flower records from and to rblora's encoding (:mod:`rblora.protocol.codec`).

A message's content is a ``RecordDict`` with an ``ArrayRecord`` "arrays" (the codec's flat
tensors, float32) and a ``ConfigRecord`` "config" (the codec's metadata plus what the message is
about: round, client, options). Bytes are counted as Flower counts an ArrayRecord
(``count_bytes``: the arrays' serialised data).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from rblora.protocol.codec import check_arrays

ARRAYS, CONFIG = "arrays", "config"


def to_content(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> RecordDict:
    """A message content from flat tensors and JSON-able metadata (nested values as JSON)."""
    flat = {
        k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v))
        for k, v in config.items()
    }
    arrays = ArrayRecord({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()})
    return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(flat)})


def from_content(
    content: RecordDict, expected: dict[str, tuple[int, ...]] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a message content; ValueError if a record is missing.

    ``expected`` (name -> shape; what a node's reply must hold, from the server's own
    knowledge): every array is judged from its metadata before anything is converted (names,
    numpy serialisation, float32, shape, byte size; :func:`rblora.protocol.codec.check_arrays`),
    then its decoded header must agree, so no array of another dtype or size is ever built."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise ValueError(
            f"message content has records {sorted(content.keys())[:8]}, expected "
            f"'{ARRAYS}' and '{CONFIG}'"
        )
    record = content.array_records[ARRAYS]
    if expected is None:
        tensors = dict(record.to_torch_state_dict())
    else:
        described = {}
        for key, array in record.items():
            if array.stype != "numpy.ndarray":
                raise ValueError(f"{str(key)[:80]}: serialised as {str(array.stype)[:40]!r}")
            described[key] = (str(array.dtype)[:40], tuple(array.shape))
        check_arrays(described, expected)
        tensors = {key: _float32_tensor(key, array) for key, array in record.items()}
    return tensors, dict(content.config_records[CONFIG])


def reply_rank(content: RecordDict, modules: Iterable[str], sends: Iterable[str]) -> int | None:
    """The rank a reply's LoRA arrays declare (from their metadata, nothing converted): the
    first sent factor's of the first module, ``A: (r, d_in)`` or ``B: (d_out, r)``; None when the
    reply holds no such array (the shape check then names what is missing)."""
    record = content.array_records.get(ARRAYS) if ARRAYS in content.array_records else None
    sends = tuple(sends)
    for module in modules:
        for name in sends:
            array = None if record is None else record.get(f"update/lora/{module}/{name}")
            shape = tuple(getattr(array, "shape", ()))
            if len(shape) == 2:
                return int(shape[0] if name == "A" else shape[1])
        return None
    return None


def _float32_tensor(key: str, array) -> torch.Tensor:
    """One checked array as a tensor: its byte size must fit its shape (a ``.npy`` header is
    at most a few hundred bytes) and its decoded dtype and shape must be those it declared."""
    values = math.prod(array.shape)
    if not values * 4 <= len(array.data) <= values * 4 + 4096:
        raise ValueError(f"{key}: {len(array.data)} bytes for {values} float32 values")
    decoded = np.load(io.BytesIO(array.data), allow_pickle=False)
    if decoded.dtype != np.float32 or tuple(decoded.shape) != tuple(array.shape):
        raise ValueError(
            f"{key}: declared float32 {tuple(array.shape)}, holds {decoded.dtype} "
            f"{tuple(decoded.shape)}"
        )
    return torch.from_numpy(decoded)


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries, as Flower serialises them."""
    return sum(record.count_bytes() for record in content.array_records.values())
