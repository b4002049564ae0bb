"""The language-model task's evaluation: suites encoded once per run, no tokenizer per round."""

from __future__ import annotations

import pytest

from rblora.data.templates import Prompter
from rblora.evaluation import EvalConfig, MCItem, evaluate_round
from rblora.evaluation.outcomes import mc_item_ids
from rblora.tasks.lm import CausalLMTask
from rblora.training import TrainConfig

PROMPTER = Prompter("alpaca_short")
SUITES = {
    "mmlu": [
        MCItem("Q: 1+1?\nA:", [" 2", " 3"], 0, "math"),
        MCItem("Q: sky?\nA:", ["The answer is: A. blue", "The answer is: B. green"], 0, "nature"),
    ],
    "test": [MCItem("Pick:", [" red", " green", " a long option"], 2, "art")],
}
LOSS_RECORDS = [
    {"instruction": "Say hi", "context": "", "response": "hi there"},
    {"instruction": "Q", "input": "Options: A. x, B. y", "output": "The answer is: B. y"},
]
TRAIN = [{"instruction": "Add", "context": "2 and 3", "response": "5"}] * 4


class CountingTokenizer:
    """A tokenizer that counts the calls that turn text into ids, delegating everything."""

    TOKENIZING = ("encode", "encode_plus", "batch_encode_plus", "tokenize", "apply_chat_template")

    def __init__(self, inner):
        self._inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._inner(*args, **kwargs)

    def __len__(self):
        return len(self._inner)

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name not in self.TOKENIZING:
            return value

        def counted(*args, **kwargs):
            self.calls += 1
            return value(*args, **kwargs)

        return counted


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    return value


def test_rounds_reuse_the_encoding_and_give_the_same_numbers(tiny_llama, tiny_tokenizer):
    tokenizer = CountingTokenizer(tiny_tokenizer)
    task = CausalLMTask(
        tiny_llama,
        tokenizer,
        {0: TRAIN},
        prompter=PROMPTER,
        train_config=TrainConfig(bf16=False, cutoff_len=256),
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        eval_suites=SUITES,
        loss_records=LOSS_RECORDS,
        progress=False,
    )
    assert tokenizer.calls > 0  # the suites were encoded (and checked) when the task was built
    tokenizer.calls = 0
    rounds = [task.evaluate({}, round_=r) for r in (1, 2)]
    assert tokenizer.calls == 0
    config = EvalConfig(batch_size=task.eval_batch_size, cutoff_len=256)
    expected = evaluate_round(tiny_llama, tiny_tokenizer, SUITES, LOSS_RECORDS, PROMPTER, config)
    assert set(expected["suites"]) == {"mmlu", "test"} and "loss" in expected
    for got in rounds:
        items = got.pop("items")  # the task asks for each question's outcome too
        assert _without_seconds(got) == _without_seconds(expected)
        for name, suite in SUITES.items():
            assert items[name]["ids"] == mc_item_ids(suite)
            hits = sum(items[name]["accuracy"]) / len(suite)
            assert hits == expected["suites"][name]["accuracy"]


def test_a_suite_the_model_cannot_score_fails_when_set(tiny_llama, tiny_tokenizer):
    task = CausalLMTask(
        tiny_llama,
        tiny_tokenizer,
        {0: TRAIN[:1]},
        prompter=PROMPTER,
        train_config=TrainConfig(bf16=False),
        target_modules=["q_proj"],
        lora_dropout=0.0,
        progress=False,
    )
    too_long = MCItem("Q:", [" a", " " + "b" * 300], 0, "s")  # the tiny model has 256 positions
    with pytest.raises(ValueError, match=r"evaluation suite 'long': item 0 .*no room"):
        task.set_evaluation({"ok": SUITES["test"], "long": [too_long]}, [])
