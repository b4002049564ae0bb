"""Helpers for the data tests: small Dolly/Alpaca files and fake ``rblora.assets`` loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DOLLY_CATEGORIES = [
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
]


def dolly_records(per_category: int = 30) -> list[dict]:
    """``per_category`` records of each Dolly category, with an extra field Dolly does not use."""
    out = []
    for c, cat in enumerate(DOLLY_CATEGORIES):
        for i in range(per_category):
            out.append(
                {
                    "instruction": f"instruction {c}-{i}",
                    "context": f"context {c}-{i}" if i % 2 else "",
                    "response": f"response {c}-{i}",
                    "category": cat,
                    "extra": 1,
                }
            )
    return out


def alpaca_records(n: int = 200) -> list[dict]:
    return [
        {"instruction": f"alpaca {i}", "input": f"in {i}" if i % 3 else "", "output": f"out {i}"}
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_array(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


# Fake tasks: name -> split -> count. "gamma" has no held-out split, "mmlu" no train split.
FAKE_INDEX = {
    "alpha": {"train": 60, "validation": 15},
    "beta": {"train": 40, "validation": 10, "test": 12},
    "gamma": {"train": 50},
    "mmlu": {"validation": 30, "test": 30},
}


def fake_task(name: str, split: str | None = None) -> list[dict]:
    split = "validation" if split is None else split
    if name not in FAKE_INDEX or split not in FAKE_INDEX[name]:
        raise ValueError(f"no {name}/{split}")
    return [
        {
            "task": name,
            "split": split,
            "question": f"{name} {split} question {i}?",
            "context": f"passage {i}" if name == "beta" else "",
            "choices": [f"{name} option {j}" for j in range(2 + i % 3)],
            "answer": i % 2,
        }
        for i in range(FAKE_INDEX[name][split])
    ]


def fake_images(name: str) -> dict:
    """200 train / 50 test 4x4 images, 5 classes; pixel [0, 0] encodes the label."""
    rng = np.random.default_rng(0)
    out = {"classes": [f"class{c}" for c in range(5)]}
    for split, n in (("train", 200), ("test", 50)):
        labels = np.arange(n, dtype=np.int64) % 5
        images = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
        images[:, 0, 0] = labels
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out
