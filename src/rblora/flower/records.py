"""Flower records from and to rblora's encoding (:mod:`rblora.protocol.codec`).

A message's content is a ``RecordDict`` with an ``ArrayRecord`` "arrays" (the codec's flat
tensors, float32) and a ``ConfigRecord`` "config" (the codec's metadata plus what the message is
about: round, client, options). Bytes are counted as Flower counts an ArrayRecord
(``count_bytes``: the arrays' serialised data).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

ARRAYS, CONFIG = "arrays", "config"


def to_content(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> RecordDict:
    """A message content from flat tensors and JSON-able metadata (nested values as JSON)."""
    flat = {
        k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v))
        for k, v in config.items()
    }
    arrays = ArrayRecord({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()})
    return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(flat)})


def from_content(content: RecordDict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a message content; ValueError if a record is missing."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise ValueError(
            f"message content has records {sorted(content.keys())}, expected "
            f"'{ARRAYS}' and '{CONFIG}'"
        )
    tensors = dict(content.array_records[ARRAYS].to_torch_state_dict())
    return tensors, dict(content.config_records[CONFIG])


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries, as Flower serialises them."""
    return sum(record.count_bytes() for record in content.array_records.values())
