"""Items: the FLoRA/RB-LoRA MMLU format, prepared records, stratified MMLU and task sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rblora.data.templates import Prompter
from rblora.evaluation.items import (
    MC_INSTRUCTION,
    MCItem,
    _stratified_counts,
    load_mc_file,
    mmlu_items,
    parse_answer,
    parse_options,
    task_items,
)

MMLU_1444 = Path("/work/shared/data/mmlu_test_1444.jsonl")
PROMPTER = Prompter("alpaca")


def test_parse_options_keeps_commas_and_counts_options():
    text = "Qusetion: Pick one Options: A. 47,XY,+13, B. False, True, C. x"
    assert parse_options(text) == ["47,XY,+13", "False, True", "x"]
    assert parse_options("Question: q Options: A. yes, B. no") == ["yes", "no"]
    five = "Question: q Options: A. a, B. b, C. c, D. d, E. e"
    assert parse_options(five) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("bad", ["Question: q", "Question: q Options: A. only one"])
def test_parse_options_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        parse_options(bad)


def test_parse_answer():
    assert parse_answer("The answer is: C. Hurler syndrome") == (
        "The answer is: ",
        2,
        "Hurler syndrome",
    )
    assert parse_answer("B.") == ("", 1, None)
    with pytest.raises(ValueError, match="not of the form"):
        parse_answer("no letter here")


def _flora(question, options, answer, subject="s"):
    letters = "ABCDEFG"
    opts = ", ".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    return {
        "instruction": MC_INSTRUCTION,
        "input": f"Qusetion: {question} Options: {opts}",
        "output": f"The answer is: {letters[answer]}. {options[answer]}",
        "class": subject,
    }


def test_load_flora_jsonl_and_prepared_records(tmp_path):
    path = tmp_path / "dev.jsonl"
    records = [
        _flora("Which?", ["one, two", "three"], 1, "alpha"),
        {
            "instruction": "Pick",
            "context": "Question: q Options: A. x, B. y, C. z",
            "response": "The answer is: C. z",
            "category": "beta",
            "choices": ["x", "y", "z"],
            "answer": 2,
        },
        {"instruction": "Write", "context": "", "response": "free text", "category": "gamma"},
        {
            "instruction": "Say it",
            "context": "",
            "response": "blue",
            "category": "delta",
            "choices": ["red", "blue"],
            "answer": 1,
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = load_mc_file(path, PROMPTER)
    assert len(items) == 3  # the record without choices is for the loss only
    first, second, third = items
    assert first.prompt == PROMPTER.prompt(MC_INSTRUCTION, records[0]["input"])
    assert first.choices == ["The answer is: A. one, two", "The answer is: B. three"]
    assert (first.answer, first.subject) == (1, "alpha")
    assert second.choices == ["The answer is: A. x", "The answer is: B. y", "The answer is: C. z"]
    assert (second.answer, second.subject) == (2, "beta")
    assert third.choices == ["red", "blue"] and third.answer == 1


def test_load_json_array(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(
        json.dumps([_flora("q1", ["a", "b", "c", "d"], 3), _flora("q2", ["e", "f"], 0)])
    )
    items = load_mc_file(path, PROMPTER)
    assert [it.answer for it in items] == [3, 0]
    assert items[0].choices[3] == "The answer is: D. d"


def test_malformed_files_name_file_and_record(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(_flora("q", ["a", "b"], 0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_mc_file(bad_line, PROMPTER)
    bad_record = tmp_path / "bad.json"
    broken = _flora("q", ["a", "b"], 0)
    broken["output"] = "The answer is: C. c"  # letter beyond the options
    bad_record.write_text(json.dumps([_flora("q", ["a", "b"], 0), broken]))
    with pytest.raises(ValueError, match=r"bad\.json: record 1"):
        load_mc_file(bad_record, PROMPTER)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(ValueError, match="record 0: unknown record keys"):
        load_mc_file(unknown, PROMPTER)
    with pytest.raises(ValueError, match="cannot read"):
        load_mc_file(tmp_path / "missing.json", PROMPTER)


@pytest.mark.skipif(not MMLU_1444.exists(), reason="the papers' 1,444-question file is not here")
def test_loads_the_papers_mmlu_1444_file_as_is():
    items = load_mc_file(MMLU_1444, PROMPTER)
    assert len(items) == 1444
    assert len({it.subject for it in items}) == 57
    assert all(len(it.choices) == 4 for it in items)
    first = items[0]
    assert first.subject == "medical_genetics" and first.answer == 2
    assert first.choices[2] == "The answer is: C. Hurler syndrome"
    assert "Recombinant alpha-iduronidase" in first.prompt
    assert items[1].choices[0] == "The answer is: A. 47,XY,+13"  # commas inside an option


def test_stratified_counts_hand_computed():
    sizes = {"a": 7, "b": 2, "c": 1}
    assert _stratified_counts(sizes, 4) == {"a": 2, "b": 1, "c": 1}  # 2.8/.8/.4 + min one
    assert _stratified_counts(sizes, 5) == {"a": 3, "b": 1, "c": 1}  # 3.5/1/.5
    assert _stratified_counts(sizes, 3) == {"a": 1, "b": 1, "c": 1}  # min one, trim "a"
    assert _stratified_counts(sizes, 10) == sizes
    assert _stratified_counts({"a": 100, "b": 50, "c": 10}, 16) == {"a": 10, "b": 5, "c": 1}
    with pytest.raises(ValueError, match="n must be in 1..10"):
        _stratified_counts(sizes, 11)


def _mmlu_records():
    records = []
    for subject, size in (("zoology", 30), ("algebra", 20), ("law", 10)):
        for i in range(size):
            records.append(
                {
                    "subject": subject,
                    "question": f"{subject} {i}?",
                    "choices": ["w", "x", "y", "z"],
                    "answer": i % 4,
                }
            )
    return records


def test_mmlu_items_stratified_and_seeded():
    records = _mmlu_records()
    items = mmlu_items(12, seed=3, prompter=PROMPTER, records=records)
    assert [it.subject for it in items] == ["algebra"] * 4 + ["law"] * 2 + ["zoology"] * 6
    again = mmlu_items(12, seed=3, prompter=PROMPTER, records=records)
    assert [it.prompt for it in items] == [it.prompt for it in again]
    other = mmlu_items(12, seed=4, prompter=PROMPTER, records=records)
    assert [it.prompt for it in items] != [it.prompt for it in other]
    first = items[0]
    assert (
        "Question: algebra " in first.prompt and "Options: A. w, B. x, C. y, D. z" in first.prompt
    )
    assert first.choices == [
        f"The answer is: {c}. {t}" for c, t in zip("ABCD", "wxyz", strict=True)
    ]
    idx = int(first.prompt.split("Question: algebra ")[1].split("?")[0])
    assert first.answer == idx % 4


def test_task_items_sample_and_context():
    records = [
        {
            "task": "t",
            "split": "validation",
            "question": f"q{i}",
            "context": "ctx" if i % 2 else "",
            "choices": ["a", "b"],
            "answer": i % 2,
        }
        for i in range(10)
    ]
    items = task_items("t", n=4, seed=0, prompter=PROMPTER, records=records)
    assert len(items) == 4 and {it.subject for it in items} == {"t"}
    assert items == task_items("t", n=4, seed=0, prompter=PROMPTER, records=records)
    all_items = task_items("t", prompter=PROMPTER, records=records)
    assert len(all_items) == 10
    assert "Question: q0 Options: A. a, B. b" in all_items[0].prompt
    assert "Question: q1 Context: ctx Options: A. a, B. b" in all_items[1].prompt
    assert all_items[1].choices == ["The answer is: A. a", "The answer is: B. b"]
    assert all_items[1].answer == 1


def test_mcitem_validation():
    with pytest.raises(ValueError, match="at least 2 choices"):
        MCItem("p", ["a"], 0, "s")
    with pytest.raises(ValueError, match="out of range"):
        MCItem("p", ["a", "b"], 2, "s")
    with pytest.raises(ValueError, match="non-empty"):
        MCItem("p", ["a", ""], 0, "s")


def test_task_items_cloze_style():
    records = [
        {
            "task": "t",
            "question": "Sky colour?",
            "context": "",
            "choices": ["blue", "red"],
            "answer": 0,
        }
    ]
    (item,) = task_items("t", prompter=PROMPTER, records=records, style="cloze")
    assert item.prompt == PROMPTER.prompt("Answer the question.", "Question: Sky colour?")
    assert item.choices == ["blue", "red"]  # the alpaca prompt ends with a newline: no space added
    with pytest.raises(ValueError, match="unknown style 'x'; valid: mmlu, cloze"):
        task_items("t", prompter=PROMPTER, records=records, style="x")
