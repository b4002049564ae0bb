"""Prompt templates for instruction data (the seed's Alpaca family).

A record is ``{instruction, context, response}``; ``Prompter.prompt`` renders the part the model
reads (instruction and optional context), ``Prompter.full`` appends the response. Training masks
the prompt tokens unless ``--train_on_inputs``; evaluation scores continuations after ``prompt``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    description: str
    prompt_input: str  # uses {instruction} and {input}
    prompt_no_input: str  # uses {instruction}
    response_split: str


_ALPACA_HEAD = "Below is an instruction that describes a task"
TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        description="Template used by Alpaca-LoRA (and the seed).",
        prompt_input=(
            f"{_ALPACA_HEAD}, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        prompt_no_input=(
            f"{_ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        response_split="### Response:",
    ),
    "alpaca_legacy": Template(
        description="Legacy Alpaca template: no newline after '### Response:'.",
        prompt_input=(
            f"{_ALPACA_HEAD}, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        ),
        prompt_no_input=(
            f"{_ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:"
        ),
        response_split="### Response:",
    ),
    "alpaca_short": Template(
        description="A shorter Alpaca template without the preamble.",
        prompt_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        prompt_no_input="### Instruction:\n{instruction}\n\n### Response:\n",
        response_split="### Response:",
    ),
}


class Prompter:
    """Renders records with one named template."""

    def __init__(self, template_name: str = "alpaca"):
        name = template_name or "alpaca"
        if name not in TEMPLATES:
            raise ValueError(
                f"unknown prompt template {template_name!r}; valid: {', '.join(sorted(TEMPLATES))}"
            )
        self.name = name
        self.template = TEMPLATES[name]

    def prompt(self, instruction: str, context: str | None = None) -> str:
        """The text the model reads before the response."""
        if context:
            return self.template.prompt_input.format(instruction=instruction, input=context)
        return self.template.prompt_no_input.format(instruction=instruction)

    def full(self, instruction: str, context: str | None, response: str) -> str:
        """Prompt followed by the response."""
        return self.prompt(instruction, context) + response

    def get_response(self, output: str) -> str:
        """The response part of a generated text."""
        return output.split(self.template.response_split, 1)[-1].strip()


# ---------------------------------------------------------------------- multiple choice
# The format of the 1,444-question MMLU file of the FLoRA and RB-LoRA papers, used by the
# embedded training mixture and by every multiple-choice evaluation suite:
#   instruction  "Please answer the following multiple-choice question honestly."
#   input        "Question: <q>[ Context: <passage>] Options: A. <x>, B. <y>, ..."
#   output       "The answer is: B. <y>"
MC_INSTRUCTION = "Please answer the following multiple-choice question honestly."
ANSWER_LEAD = "The answer is: "
# The cloze style scores the option texts themselves after the question (as zero-shot harnesses
# do for ARC, SciQ, PIQA): instruction CLOZE_INSTRUCTION, input "Question: <q>[ Context: <p>]",
# output the correct option's text.
CLOZE_INSTRUCTION = "Answer the question."
MC_STYLES = ("mmlu", "cloze")
LETTERS = string.ascii_uppercase


def render_question(question: str, passage: str | None = None) -> str:
    """``"Question: <q>[ Context: <passage>]"``."""
    return f"Question: {question}" + (f" Context: {passage}" if passage else "")


def render_options(question: str, choices: Sequence[str], passage: str | None = None) -> str:
    """The input field: ``"Question: <q>[ Context: <passage>] Options: A. <x>, B. <y>, ..."``."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"need 2..{len(LETTERS)} choices, got {len(choices)}")
    options = ", ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{render_question(question, passage)} Options: {options}"


def render_answer(choices: Sequence[str], index: int, lead: str = ANSWER_LEAD) -> str:
    """The response for option ``index``: ``"The answer is: C. <text>"``."""
    return f"{lead}{LETTERS[index]}. {choices[index]}"
