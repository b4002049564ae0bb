"""tokenize_records: masking, EOS, cutoff, and the prompt/response boundary."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny_tokenizer
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


def test_cutoff_cuts_the_prompt_from_the_left_keeping_the_response(tiny_tokenizer):
    p = Prompter("alpaca_short")
    (whole,) = tokenize_records([REC], tiny_tokenizer, p, cutoff_len=512, train_on_inputs=False)
    (ex,) = tokenize_records([REC], tiny_tokenizer, p, cutoff_len=10, train_on_inputs=False)
    assert ex["input_ids"] == whole["input_ids"][-10:]  # the prompt's tail, "5", EOS
    assert ex["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert ex["labels"] == [IGNORE_INDEX] * 8 + ex["input_ids"][-2:]  # "5" and EOS trained


def test_cutoff_keeps_the_leading_bos():
    from tokenizers import processors

    tok = build_tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    p = Prompter("alpaca_short")
    (whole,) = tokenize_records([REC], tok, p, cutoff_len=512, train_on_inputs=False)
    assert whole["input_ids"][0] == tok.bos_token_id
    (ex,) = tokenize_records([REC], tok, p, cutoff_len=10, train_on_inputs=False)
    assert ex["input_ids"] == [tok.bos_token_id] + whole["input_ids"][-9:]
    assert ex["labels"] == [IGNORE_INDEX] * 8 + ex["input_ids"][-2:]


def test_a_response_longer_than_the_cutoff_keeps_its_start(tiny_tokenizer):
    p = Prompter("alpaca_short")
    rec = {**REC, "response": "0123456789"}
    (ex,) = tokenize_records([rec], tiny_tokenizer, p, cutoff_len=4, train_on_inputs=False)
    assert tiny_tokenizer.decode(ex["input_ids"]) == "0123"
    assert ex["labels"] == ex["input_ids"]


def test_keep_response_by_hand():
    from rblora.utils.sequences import keep_response

    ids = [1, 10, 11, 12, 13, 20, 21, 2]  # BOS, 4 prompt tokens, 2 response tokens, EOS
    assert keep_response(ids, 5, 1, 8) == (ids, 5)
    assert keep_response(ids, 5, 1, 6) == ([1, 12, 13, 20, 21, 2], 3)
    assert keep_response(ids, 5, 1, 4) == ([1, 20, 21, 2], 1)
    assert keep_response(ids, 5, 1, 3) == ([1, 20, 21], 1)  # the response keeps its start
    assert keep_response(ids, 5, 0, 3) == ([20, 21, 2], 0)
    assert keep_response(ids, 5, 1, 1) == ([20], 0)  # no room for BOS next to a token


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
