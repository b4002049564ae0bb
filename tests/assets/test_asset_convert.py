"""Row converters of the data assets, on hand-written rows."""

from __future__ import annotations

import numpy as np
import pytest

from rblora.assets import mmlu, tasks


def _convert(task, row):
    return tasks.CONVERTERS[task][1]()(row)


def test_mmlu_rows_and_header_rows():
    row = {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5",
           "answer_d": "6", "correct_answer": "B", "topic": "elementary mathematics"}  # fmt: skip
    assert mmlu.convert_row(row) == {
        "subject": "elementary_mathematics",
        "question": "2+2?",
        "choices": ["3", "4", "5", "6"],
        "answer": 1,
    }
    header = {k: k for k in row} | {"correct_answer": "answer"}
    assert mmlu.convert_row(header) is None
    with pytest.raises(Exception, match="bad correct_answer"):
        mmlu.convert_row(row | {"correct_answer": "E"})


def test_keyed_choices_use_the_label_position():
    row = {"question": "q", "choices": {"text": ["w", "x", "y"], "label": ["1", "2", "3"]},
           "answerKey": "3"}  # fmt: skip
    assert _convert("arc_easy", row) == ("q", "", ["w", "x", "y"], 2)


def test_pair_and_label_tasks():
    boolq = {"question": "q", "passage": "p", "answer": True}
    assert _convert("boolq", boolq) == ("q", "p", ["no", "yes"], 1)
    rte = {"sentence1": "a", "sentence2": "b", "label": 0}
    assert _convert("rte", rte) == ("b", "a", ["yes", "no"], 0)
    wino = {"sentence": "s _", "option1": "A", "option2": "B", "answer": "2"}
    assert _convert("winogrande", wino) == ("s _", "", ["A", "B"], 1)
    siqa = {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "x"}
    assert _convert("socialiqa", siqa | {"label": "1"}) == ("q", "c", ["a", "b", "x"], 0)


def test_sciq_shuffle_keeps_the_correct_answer_and_is_seeded():
    row = {"question": "q", "support": "s", "distractor1": "d1", "distractor2": "d2",
           "distractor3": "d3", "correct_answer": "ok"}  # fmt: skip
    first, second = tasks.CONVERTERS["sciq"][1](), tasks.CONVERTERS["sciq"][1]()
    positions = []
    for _ in range(40):
        q, ctx, choices, answer = first(row)
        assert choices[answer] == "ok" and sorted(choices) == ["d1", "d2", "d3", "ok"]
        assert second(row) == (q, ctx, choices, answer)  # same seed, same order
        positions.append(answer)
    assert len(set(positions)) == 4
    assert np.bincount(positions).max() < 20
