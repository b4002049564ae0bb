"""Held-out response loss and the per-round evaluation dict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rblora.data.templates import Prompter
from rblora.evaluation import (
    EvalConfig,
    MCItem,
    encode_evaluation,
    evaluate_encoded,
    evaluate_round,
    response_loss,
    score_multiple_choice,
)

PROMPTER = Prompter("alpaca_short")
RECORDS = [
    {"instruction": "Say hi", "context": "", "response": "hi there", "category": "a"},
    {"instruction": "Add", "context": "2 and 3", "response": "5", "category": "b"},
    {"instruction": "Q", "input": "Options: A. x, B. y", "output": "The answer is: B. y"},  # FLoRA
]


def naive_loss(model, tokenizer, records, cutoff_len):
    """Token-weighted NLL of response + EOS tokens, one sequence at a time (the prompt cut from
    the left to fit ``cutoff_len``; the tiny tokenizer adds no special token)."""
    total, count = 0.0, 0
    for rec in records:
        instruction = rec["instruction"]
        context = rec.get("context", rec.get("input"))
        response = rec.get("response", rec.get("output"))
        prompt = tokenizer(PROMPTER.prompt(instruction, context))["input_ids"]
        full = tokenizer(PROMPTER.full(instruction, context, response))["input_ids"]
        full = full + [tokenizer.eos_token_id]
        cut = max(0, len(full) - cutoff_len)
        full, prompt = full[cut:], prompt[cut:]
        with torch.no_grad():
            logp = tiny_logp(model, full)
        for k in range(len(prompt), len(full)):
            total -= logp[k - 1, full[k]].item()
            count += 1
    return total / count, count


def tiny_logp(model, ids):
    return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_response_loss_equals_naive(tiny_llama, tiny_tokenizer):
    ref, tokens = naive_loss(tiny_llama, tiny_tokenizer, RECORDS, cutoff_len=512)
    got = response_loss(tiny_llama, tiny_tokenizer, RECORDS, PROMPTER, batch_tokens=60)
    assert got["tokens"] == tokens == len("hi there") + len("5") + len("The answer is: B. y") + 3
    assert got["loss"] == pytest.approx(ref, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert got["records"] == 3


def test_response_loss_cutoff_cuts_the_prompt_from_the_left(tiny_llama, tiny_tokenizer):
    prompt_len = len(tiny_tokenizer(PROMPTER.prompt("Say hi", ""))["input_ids"])
    response = len("hi there") + 1  # and the EOS
    for cutoff in (prompt_len + 3, response + 1):  # the response and EOS stay whole
        ref, tokens = naive_loss(tiny_llama, tiny_tokenizer, RECORDS[:1], cutoff_len=cutoff)
        got = response_loss(tiny_llama, tiny_tokenizer, RECORDS[:1], PROMPTER, cutoff_len=cutoff)
        assert got["tokens"] == tokens == response and got["records"] == 1
        assert got["loss"] == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError, match="loss record 0"):
        response_loss(tiny_llama, tiny_tokenizer, [{"instruction": "x"}], PROMPTER)


class _BarePrompter:
    """No prompt text at all: the response starts the sequence."""

    def prompt(self, instruction, context=None):
        return ""

    def full(self, instruction, context, response):
        return response


def test_response_loss_without_prompt_scores_the_first_token_after_eos(tiny_llama):
    from tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(bos_token=None)  # adds no BOS and declares none
    records = [{"instruction": "x", "context": "", "response": "hi"}]
    eos = tokenizer.eos_token_id
    ids = [eos] + tokenizer("hi")["input_ids"] + [eos]  # start token (EOS), "h", "i", EOS
    with torch.no_grad():
        logp = tiny_logp(tiny_llama, ids)
    ref = -sum(logp[k - 1, ids[k]].item() for k in range(1, len(ids))) / 3
    got = response_loss(tiny_llama, tokenizer, records, _BarePrompter())
    assert got["tokens"] == 3  # "h" is scored too
    assert got["loss"] == pytest.approx(ref, abs=1e-5)
    bare = build_tiny_tokenizer(bos_token=None, eos_token=None)
    with pytest.raises(ValueError, match="loss record 0: .*neither a BOS nor an EOS"):
        response_loss(tiny_llama, bare, records, _BarePrompter())


def test_evaluate_round_dict(tiny_llama, tiny_tokenizer):
    suites = {
        "mmlu": [
            MCItem("Q: 1+1?\nA:", [" 2", " 3"], 0, "math"),
            MCItem("Q: sky?\nA:", [" blue", " green", " red"], 0, "nature"),
        ],
        "empty": [],
    }
    config = EvalConfig(batch_tokens=64, cutoff_len=256)
    out = evaluate_round(tiny_llama, tiny_tokenizer, suites, RECORDS, PROMPTER, config)
    json.dumps(out)  # serialisable as is
    assert set(out) == {"suites", "loss", "perplexity", "loss_tokens", "loss_seconds", "seconds"}
    assert list(out["suites"]) == ["mmlu"]
    direct = score_multiple_choice(tiny_llama, tiny_tokenizer, suites["mmlu"]).to_dict()
    mmlu = out["suites"]["mmlu"]
    for key in ("count", "accuracy", "acc_norm", "macro_accuracy", "macro_acc_norm", "per_subject"):
        assert mmlu[key] == direct[key]
    assert set(mmlu["per_subject"]) == {"math", "nature"}
    loss = response_loss(tiny_llama, tiny_tokenizer, RECORDS, PROMPTER, cutoff_len=256)
    assert out["loss"] == pytest.approx(loss["loss"], abs=1e-9)
    no_loss = evaluate_round(tiny_llama, tiny_tokenizer, suites, None, PROMPTER, config)
    assert "loss" not in no_loss


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    return value


def test_encoded_once_evaluates_as_evaluate_round(tiny_llama, tiny_tokenizer):
    suites = {"mc": [MCItem("Q: 1+1?\nA:", [" 2", " 3"], 0, "math")], "empty": []}
    config = EvalConfig(batch_tokens=64, cutoff_len=256)
    encoded = encode_evaluation(tiny_tokenizer, suites, RECORDS, PROMPTER, config, context=256)
    assert list(encoded.suites) == ["mc"]
    expected = evaluate_round(tiny_llama, tiny_tokenizer, suites, RECORDS, PROMPTER, config)
    for _ in range(2):  # the encoded form is not used up
        got = evaluate_encoded(tiny_llama, encoded, config)
        assert _without_seconds(got) == _without_seconds(expected)
    # batching and autocast may change; the options that decide the tokens may not
    evaluate_encoded(tiny_llama, encoded, EvalConfig(batch_size=1, cutoff_len=256))
    with pytest.raises(ValueError, match="encoded with .*'cutoff_len': 256.*'cutoff_len': 512"):
        evaluate_encoded(tiny_llama, encoded, EvalConfig())


def test_encode_evaluation_names_what_cannot_be_scored(tiny_tokenizer):
    long = MCItem("Q:", [" a", " " + "b" * 30], 0, "s")
    with pytest.raises(ValueError, match=r"evaluation suite 'x': item 0 .*no room"):
        encode_evaluation(tiny_tokenizer, {"x": [long]}, None, PROMPTER, context=20)
    empty = {"instruction": "Say hi", "context": "", "response": ""}
    with pytest.raises(ValueError, match=r"held-out loss: no record has a response token"):
        encode_evaluation(
            tiny_tokenizer, {}, [empty], PROMPTER, EvalConfig(cutoff_len=20, add_eos=False)
        )


def test_eval_config_validation():
    with pytest.raises(ValueError, match="unknown strategy 'fast'; valid: packed, flat"):
        EvalConfig(strategy="fast")
    with pytest.raises(ValueError, match="batch_tokens must be >= 1"):
        EvalConfig(batch_tokens=0)
