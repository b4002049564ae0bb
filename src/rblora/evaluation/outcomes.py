"""Per-item outcomes of an evaluation: which question (or image) the model got right.

The figures of a round (``accuracy``, ``acc_norm``) are means over items; two models scored on the
same items can be compared item by item (``rblora.experiments.paired``), which needs each item's
outcome under a name that does not depend on where the item sits in a list. An item's id is a
hash of what the model is scored on:

- a multiple-choice question: sha256 of ``[prompt, choices, answer]`` (its rendered text), so a
  question keeps its id whichever subset or order a run scores it in;
- an image: sha256 of its label and its pixels as the model reads them (resized, uint8).

Two identical items get ``<id>~2``, ``<id>~3``... in order of appearance (they are the same item
to the model, so which one pairs with which does not matter).

One suite's outcomes, as stored in a run folder's ``evaluation/round_<t>.json``::

    {"ids": [str, ...], "accuracy": [0 | 1, ...], "acc_norm": [0 | 1, ...]}

(``acc_norm`` for multiple choice only; an image suite's ``accuracy`` is top-1.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import torch

from rblora.evaluation.items import MCItem

#: Hex digits of sha256 kept in an id (64 bits: no collision among a test set's items).
ID_DIGITS = 16


def _unique(ids: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for value in ids:
        seen[value] = seen.get(value, 0) + 1
        out.append(value if seen[value] == 1 else f"{value}~{seen[value]}")
    return out


def mc_item_ids(items: Sequence[MCItem]) -> list[str]:
    """Ids of multiple-choice items: a hash of each one's prompt, choices and answer."""
    return _unique(
        hashlib.sha256(
            json.dumps([it.prompt, list(it.choices), it.answer], ensure_ascii=False).encode()
        ).hexdigest()[:ID_DIGITS]
        for it in items
    )


def image_item_ids(pixels: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Ids of images ``pixels: (n, C, H, W)`` uint8 with ``labels: (n,)``: a hash of each
    label and image."""
    flat = pixels.detach().to("cpu").contiguous().reshape(len(pixels), -1).numpy()
    return _unique(
        hashlib.sha256(int(y).to_bytes(8, "little") + row.tobytes()).hexdigest()[:ID_DIGITS]
        for y, row in zip(labels.tolist(), flat, strict=True)
    )


def suite_outcomes(ids: Sequence[str], **correct: Sequence[bool]) -> dict:
    """One suite's outcomes: ``{"ids": [...], <measure>: [0 | 1, ...], ...}``; every list as
    long as ``ids`` (ValueError otherwise)."""
    out: dict = {"ids": list(ids)}
    for measure, values in correct.items():
        if len(values) != len(ids):
            raise ValueError(f"{measure}: {len(values)} outcomes for {len(ids)} items")
        out[measure] = [int(bool(v)) for v in values]
    return out
