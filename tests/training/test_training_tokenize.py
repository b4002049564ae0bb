"""tokenize_records: masking, EOS, cutoff, and the prompt/response boundary."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from rblora.data.templates import Prompter
from rblora.training import IGNORE_INDEX, tokenize_records

REC = {"instruction": "Add 2 and 3.", "context": "", "response": "5"}


def test_prompt_masked_and_eos_appended(tiny_tokenizer):
    p = Prompter("alpaca_short")
    (ex,) = tokenize_records([REC], tiny_tokenizer, p, cutoff_len=512, train_on_inputs=False)
    prompt = p.prompt(REC["instruction"])
    n = len(prompt)  # char-level tokenizer: one token per character
    assert len(ex["input_ids"]) == n + 1 + 1  # prompt, "5", EOS
    assert ex["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert tiny_tokenizer.decode(ex["input_ids"][n : n + 1]) == "5"


def test_train_on_inputs_keeps_all_labels_and_context_is_used(tiny_tokenizer):
    p = Prompter("alpaca")
    rec = {"instruction": "Sum.", "context": "2 3", "response": "5"}
    (ex,) = tokenize_records([rec], tiny_tokenizer, p, cutoff_len=1024, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]
    assert "### Input:\n2 3" in tiny_tokenizer.decode(ex["input_ids"])


def test_cutoff_truncates_without_eos(tiny_tokenizer):
    p = Prompter("alpaca_short")
    (ex,) = tokenize_records([REC], tiny_tokenizer, p, cutoff_len=10, train_on_inputs=False)
    assert len(ex["input_ids"]) == 10
    assert tiny_tokenizer.eos_token_id not in ex["input_ids"]
    assert ex["labels"] == [IGNORE_INDEX] * 10  # all prompt


def test_boundary_merge_masks_common_prefix_only():
    # a BPE whose merge "\n" + "5" joins the prompt's last character with the response's first
    chars = sorted(set(Prompter("alpaca_short").prompt("Add 2 and 3.") + "5"))
    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    vocab["\n5"] = len(vocab)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "5")])),
        pad_token="<pad>",
        eos_token="</s>",
    )
    p = Prompter("alpaca_short")
    (ex,) = tokenize_records([REC], tok, p, cutoff_len=512, train_on_inputs=False)
    n_prompt = len(tok(p.prompt(REC["instruction"]))["input_ids"])
    assert ex["input_ids"][n_prompt - 1] == vocab["\n5"]  # the straddling token
    assert ex["labels"][: n_prompt - 1] == [IGNORE_INDEX] * (n_prompt - 1)
    assert ex["labels"][n_prompt - 1 :] == [vocab["\n5"], 1]  # straddling token and EOS trained


def test_bad_record_is_reported(tiny_tokenizer):
    with pytest.raises(ValueError, match="record 1"):
        tokenize_records([REC, {"question": "x"}], tiny_tokenizer, Prompter(), 64, False)


def test_no_records_gives_no_examples(tiny_tokenizer):
    assert tokenize_records([], tiny_tokenizer, Prompter("alpaca"), 64, False) == []
