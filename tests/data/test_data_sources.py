"""Source readers: Dolly/Alpaca parsing (both layouts, line numbers), MC formatting, mixture."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import alpaca_records, dolly_records, fake_task, write_array, write_jsonl

from rblora.data import sources as S


def test_dolly_jsonl_and_array_give_the_same_records(tmp_path):
    recs = dolly_records(3)
    a, digest_a = S.read_dolly(write_jsonl(tmp_path / "d.jsonl", recs))
    b, digest_b = S.read_dolly(write_array(tmp_path / "d.json", recs))
    assert a == b
    assert a[1] == {  # exactly the four fields, extra ones dropped
        "instruction": "instruction 0-1",
        "context": "context 0-1",
        "response": "response 0-1",
        "category": "brainstorming",
    }
    assert digest_a != digest_b and len(digest_a) == 64


def test_alpaca_mapping(tmp_path):
    recs, _ = S.read_alpaca(write_array(tmp_path / "a.json", alpaca_records(4)))
    assert recs[1] == {
        "instruction": "alpaca 1",
        "context": "in 1",
        "response": "out 1",
        "category": "alpaca",
    }
    assert recs[0]["context"] == ""


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"instruction": "a", "response": "b", "category": "c"}\n{"instruction": \n', ":2:"),
        ('{"instruction": "a", "response": "b", "category": "c"}\n\n{"response": "b"}\n', ":3:"),
        (
            '[\n {"instruction": "a", "response": "b", "category": "c"},\n {"instruction": 1}\n]',
            ":3:",
        ),
        ('[\n {"instruction": "a", "response": "b", "category": "c"},\n\n {"x": }\n]', ":4:"),
        ('[\n {"instruction": "a", "response": "b", "category": "c"}\n {"x": 1}\n]', ":3:"),
        ('[\n "just a string"\n]', ":2:"),
    ],
)
def test_malformed_dolly_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        S.read_dolly(path)
    assert f"{path}{where}" in str(err.value)


def test_missing_field_message(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "category": "c"}])
    with pytest.raises(
        ValueError, match=r"d\.jsonl:1: field 'response' must be a string, got missing"
    ):
        S.read_dolly(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="cannot be downloaded") as err:
        S.read_dolly(tmp_path / "nope.jsonl")
    assert "--dolly PATH" in str(err.value)
    with pytest.raises(ValueError, match="--alpaca PATH"):
        S.read_alpaca(tmp_path / "nope.json")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        S.read_dolly(tmp_path / "empty.jsonl")


def test_format_multiple_choice_matches_the_mmlu_style():
    rec = {
        "task": "arc",
        "question": "Which?",
        "context": "",
        "choices": ["x", "y", "z"],
        "answer": 2,
    }
    assert S.format_multiple_choice(rec) == {
        "instruction": "Please answer the following multiple-choice question honestly.",
        "context": "Question: Which? Options: A. x, B. y, C. z",
        "response": "The answer is: C. z",
        "category": "arc",
        "task": "arc",
        "choices": ["x", "y", "z"],
        "answer": 2,
    }
    boolq = {
        "task": "boolq",
        "question": "is it?",
        "context": "Passage.",
        "choices": ["no", "yes"],
        "answer": 1,
    }
    out = S.format_multiple_choice(boolq)
    assert out["context"] == "Question: is it? Context: Passage. Options: A. no, B. yes"
    assert out["response"] == "The answer is: B. yes"
    ending = {
        "task": "hs",
        "question": "",
        "context": "He opens the",
        "choices": ["door", "sky"],
        "answer": 0,
    }
    assert S.format_multiple_choice(ending)["context"] == (
        "Question: He opens the Options: A. door, B. sky"
    )
    with pytest.raises(ValueError, match="answer must be an index in 0..1"):
        S.format_multiple_choice({**boolq, "answer": 2})
    with pytest.raises(ValueError, match="choices must be a list"):
        S.format_multiple_choice({**boolq, "choices": ["only"]})


def test_mixture_from_fake_assets(fake_assets):
    src = S.load_mixture(None, per_task=30, reserve=5, rng=np.random.default_rng(0))
    assert src.categories == ["alpha", "beta", "gamma"]  # mmlu left out
    counts = np.bincount(src.train_labels, minlength=3).tolist()
    assert counts == [30, 30, 30]  # alpha 60, beta 40, gamma 50-5 available: all capped at 30
    held = np.bincount(src.heldout_labels, minlength=3).tolist()
    assert held == [15, 10, 5]  # alpha/beta: their validation split; gamma: 5 held out of train
    assert src.checksums["gamma"]["heldout_split"] == "train (held out)"
    gamma_train = {r["context"] for r in src.train if r["task"] == "gamma"}
    gamma_held = {r["context"] for r in src.heldout if r["task"] == "gamma"}
    assert not gamma_train & gamma_held
    assert all(r["category"] == r["task"] and "choices" in r for r in src.train)
    again = S.load_mixture(None, per_task=30, reserve=5, rng=np.random.default_rng(0))
    assert again.train == src.train


def test_mixture_single_split_task_and_errors(fake_assets):
    src = S.load_mixture(["mmlu"], per_task=100, reserve=10, rng=np.random.default_rng(0))
    assert len(src.train) == 20 and len(src.heldout) == 10  # validation 30 = 10 held + 20 train
    assert not {r["context"] for r in src.train} & {r["context"] for r in src.heldout}
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]; valid: alpha, beta"):
        S.load_mixture(["nope"], 10, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'gamma' has 50 records, not enough to hold out 50"):
        S.load_mixture(["gamma"], 10, 50, np.random.default_rng(0))


def test_checksum_changes_with_content(fake_assets, monkeypatch):
    a = S.load_mixture(["alpha"], 10, 5, np.random.default_rng(0)).checksums["alpha"]["sha256"]

    def changed(name, split=None):
        recs = fake_task(name, split)
        recs[0] = {**recs[0], "question": "edited"}
        return recs

    monkeypatch.setattr(fake_assets, "load_task", changed)
    b = S.load_mixture(["alpha"], 10, 5, np.random.default_rng(0)).checksums["alpha"]["sha256"]
    assert a != b


def test_mixture_drops_duplicates_so_nothing_is_trained_on_and_held_out(fake_assets, monkeypatch):
    def with_duplicates(name, split=None):
        recs = fake_task(name, split)
        if name == "alpha" and split == "train":  # a validation item and an internal repeat
            recs += [fake_task("alpha", "validation")[3], recs[0]]
        if name == "gamma":
            recs += recs[:5]
        return recs

    monkeypatch.setattr(fake_assets, "load_task", with_duplicates)
    src = S.load_mixture(["alpha", "gamma"], 1000, 5, np.random.default_rng(0))
    assert src.checksums["alpha"]["duplicates_dropped"] == 2
    assert src.checksums["gamma"]["duplicates_dropped"] == 5
    assert np.bincount(src.train_labels).tolist() == [60, 45]
    keys = [S._item_key(r) for r in src.train + src.heldout]
    assert len(keys) == len(set(keys))


def test_format_multiple_choice_in_the_cloze_style_scores_the_option_texts():
    from rblora.data.templates import Prompter
    from rblora.evaluation.items import _prepared_item

    rec = {"task": "sciq", "question": "Which gas?", "context": "Plants make it.",
           "choices": ["oxygen", "neon"], "answer": 0}  # fmt: skip
    out = S.format_multiple_choice(rec, "cloze")
    assert out["instruction"] == "Answer the question."
    assert out["context"] == "Question: Which gas? Context: Plants make it."
    assert out["response"] == "oxygen" and out["style"] == "cloze"
    item = _prepared_item(out, Prompter("alpaca_legacy"))  # prompt ends with "Response:"
    assert item.choices == [" oxygen", " neon"] and item.answer == 0
    assert _prepared_item(out, Prompter("alpaca_short")).choices == ["oxygen", "neon"]
    with pytest.raises(ValueError, match="unknown multiple-choice style 'plain'"):
        S.format_multiple_choice(rec, "plain")
