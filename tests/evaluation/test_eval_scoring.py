"""Batched multiple-choice scoring against a naive one-sequence-at-a-time reference."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import build_tiny_llama

from rblora.evaluation.encoding import leading_special_ids, split_continuations
from rblora.evaluation.forward import plan_batches
from rblora.evaluation.items import MCItem
from rblora.evaluation.multiple_choice import score_multiple_choice, scored_parts, summarize

ITEMS = [
    MCItem("Q: what is 2+2?\nA:", [" four", " 5", " twenty two"], 0, "math"),
    MCItem("Short:", [" yes", " no"], 1, "misc"),
    MCItem(
        "A much longer prompt, with words and more words.\n### Response:\n",
        [
            "The answer is: A. x",
            "The answer is: B. yy",
            "The answer is: C. zzz",
            "The answer is: D. w",
        ],
        2,
        "misc",
    ),
    MCItem(
        "Pick a colour", [" red", " green", " blue", " cyan", " a very long option text"], 4, "art"
    ),
]


def naive_loglikelihoods(model, tokenizer, items, max_length=None):
    """One forward per option over the full text; sum of log-probs of the continuation tokens.

    Context and continuations are the scorer's (``scored_parts``: the options' shared lead is
    context; tested on its own). Truncation: every option of an item keeps the same prompt
    tokens, the last ``max_length - longest continuation`` of them.
    """
    out = []
    model.eval()
    for it in items:
        context, continuations = scored_parts(it)
        prompt = tokenizer(context)["input_ids"]
        fulls, n_conts = [], []
        for choice in continuations:
            full = tokenizer(context + choice)["input_ids"]
            n_prompt = 0
            while n_prompt < len(prompt) and prompt[n_prompt] == full[n_prompt]:
                n_prompt += 1
            fulls.append(full)
            n_conts.append(len(full) - n_prompt)
        keep = None if max_length is None else max_length - max(n_conts)
        row = []
        for full, n_cont in zip(fulls, n_conts, strict=True):
            if keep is not None:
                full = full[max(0, len(full) - n_cont - keep) :]
            with torch.no_grad():
                logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
            row.append(
                sum(logp[k - 1, full[k]].item() for k in range(len(full) - n_cont, len(full)))
            )
        out.append(row)
    return out


def max_abs_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.parametrize("strategy", ["packed", "flat"])
@pytest.mark.parametrize("batch_tokens", [30, 4096])
def test_batched_equals_naive_reference(tiny_llama, tiny_tokenizer, strategy, batch_tokens):
    ref = naive_loglikelihoods(tiny_llama, tiny_tokenizer, ITEMS)
    got = score_multiple_choice(
        tiny_llama, tiny_tokenizer, ITEMS, strategy=strategy, batch_tokens=batch_tokens
    )
    assert max_abs_diff(got.loglikelihoods, ref) < 1e-4
    assert got.predictions == [max(range(len(r)), key=r.__getitem__) for r in ref]


def test_eager_attention_equals_reference(tiny_tokenizer):
    model = build_tiny_llama(vocab_size=len(tiny_tokenizer), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ref = naive_loglikelihoods(model, tiny_tokenizer, ITEMS)
    got = score_multiple_choice(model, tiny_tokenizer, ITEMS, batch_tokens=64)
    assert max_abs_diff(got.loglikelihoods, ref) < 1e-4


def test_left_truncation_keeps_the_continuation(tiny_llama, tiny_tokenizer):
    items = [MCItem("x" * 40 + " long prompt end:", [" ab", " abcdef"], 0, "s")]
    ref = naive_loglikelihoods(tiny_llama, tiny_tokenizer, items, max_length=20)
    got = score_multiple_choice(tiny_llama, tiny_tokenizer, items, max_length=20)
    assert max_abs_diff(got.loglikelihoods, ref) < 1e-4
    full = score_multiple_choice(tiny_llama, tiny_tokenizer, items)
    assert max_abs_diff(got.loglikelihoods, full.loglikelihoods) > 1e-4  # the context did shrink
    with pytest.raises(ValueError, match="item 0"):
        score_multiple_choice(tiny_llama, tiny_tokenizer, items, max_length=7)


def test_peft_model_and_train_mode_restored(tiny_llama, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    tiny_llama.config.attention_dropout = 0.5  # dropout would perturb scores if left in train mode
    model = get_peft_model(
        tiny_llama,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    ref = naive_loglikelihoods(model, tiny_tokenizer, ITEMS)
    model.train()
    got = score_multiple_choice(model, tiny_tokenizer, ITEMS, batch_tokens=64)
    assert model.training
    assert max_abs_diff(got.loglikelihoods, ref) < 1e-4
    with model.disable_adapter():
        plain = naive_loglikelihoods(model, tiny_tokenizer, ITEMS[:1])
    assert abs(plain[0][0] - ref[0][0]) > 1e-3  # the LoRA delta is really in the scores


def test_bf16_autocast_close_to_fp32(tiny_llama, tiny_tokenizer):
    fp32 = score_multiple_choice(tiny_llama, tiny_tokenizer, ITEMS)
    bf16 = score_multiple_choice(tiny_llama, tiny_tokenizer, ITEMS, autocast_bf16=True)
    assert 0 < max_abs_diff(bf16.loglikelihoods, fp32.loglikelihoods) < 0.1


def _with_bos(tokenizer):
    from tokenizers import processors

    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def test_leading_bos_is_kept(tiny_llama, tiny_tokenizer):
    tok = _with_bos(tiny_tokenizer)
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    assert leading_special_ids(tok) == [tok.bos_token_id]
    ref = naive_loglikelihoods(tiny_llama, tok, ITEMS)
    got = score_multiple_choice(tiny_llama, tok, ITEMS, batch_tokens=50)
    assert max_abs_diff(got.loglikelihoods, ref) < 1e-4


def test_split_continuations_boundary_rule():
    # the tokenizer merged the prompt's last token (3) with the continuation (-> 9)
    prefix, suffixes = split_continuations(
        [1, 2, 3], [[1, 2, 9, 5], [1, 2, 3, 7]], None, start_id=None
    )
    assert prefix == (1, 2)
    assert suffixes == [((9, 5), 2), ((3, 7), 1)]  # option 2 reads token 3 unscored
    prefix, suffixes = split_continuations(
        [1, 2, 3], [[1, 2, 3, 4, 5]], max_length=3, start_id=None
    )
    assert prefix == (3,) and suffixes == [((4, 5), 2)]
    with pytest.raises(ValueError, match="no tokens of its own"):
        split_continuations([1, 2], [[1, 2]], None, start_id=None)


def test_split_continuations_start_token_when_no_context_token_is_shared():
    # no prompt and no BOS: the start token is the context, every option token is scored
    prefix, suffixes = split_continuations([], [[4, 5, 6], [7, 8]], None, start_id=2)
    assert prefix == (2,) and suffixes == [((4, 5, 6), 3), ((7, 8), 2)]
    # option 0 merged the one-token prompt (7) into its first token (9); option 1 did not
    prefix, suffixes = split_continuations([7], [[9, 5], [7, 3]], None, start_id=2)
    assert prefix == (2,) and suffixes == [((9, 5), 2), ((7, 3), 1)]
    prefix, suffixes = split_continuations([], [[4], [5, 6]], None, start_id=2)  # one token
    assert prefix == (2,) and suffixes == [((4,), 1), ((5, 6), 2)]
    prefix, suffixes = split_continuations([], [[4, 5, 6]], max_length=4, start_id=2)
    assert prefix == (2,) and suffixes == [((4, 5, 6), 3)]
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        split_continuations([], [[4, 5, 6]], None, start_id=None)
    # a shared context token needs no start token
    assert split_continuations([1], [[1, 4]], None, start_id=None) == ((1,), [((4,), 1)])


def test_plan_batches_respects_budget():
    from rblora.evaluation.encoding import Row, Segment

    rows = [Row((1,) * n, (Segment((2,), 1, i),)) for i, n in enumerate([3, 9, 5, 1, 7])]
    batches = plan_batches(rows, batch_tokens=20, batch_size=3)
    assert batches == [[1, 4], [2, 0, 3]]  # lengths 10, 8 | 6, 4, 2 (longest first)
    assert all(len(b) * rows[b[0]].length <= 20 for b in batches)
    with pytest.raises(ValueError, match="batch_tokens"):
        plan_batches(rows, 0, 1)


def test_summarize_hand_computed():
    items = [
        MCItem("p", ["aaaa", "b"], 0, "s1"),  # ll -4 vs -2: acc picks 1 (wrong); norm -1 vs -2 -> 0
        MCItem("p", ["a", "b"], 1, "s1"),  # -3 vs -1: right either way
        MCItem("p", ["a", "b", "c"], 2, "s2"),  # -1, -5, -2: wrong either way
    ]
    res = summarize(items, [[-4.0, -2.0], [-3.0, -1.0], [-1.0, -5.0, -2.0]])
    assert res.count == 3
    assert res.accuracy == pytest.approx(1 / 3)
    assert res.acc_norm == pytest.approx(2 / 3)
    assert res.per_subject["s1"].accuracy == 0.5 and res.per_subject["s1"].acc_norm == 1.0
    assert res.per_subject["s2"].accuracy == 0.0
    assert res.macro_accuracy == pytest.approx(0.25)
    assert res.macro_acc_norm == pytest.approx(0.5)
    d = res.to_dict()
    assert d["per_subject"]["s2"] == {"count": 1, "accuracy": 0.0, "acc_norm": 0.0}
    assert not math.isnan(d["accuracy"])


def test_empty_and_bad_arguments(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="no items"):
        score_multiple_choice(tiny_llama, tiny_tokenizer, [])
    with pytest.raises(ValueError, match="unknown strategy"):
        score_multiple_choice(tiny_llama, tiny_tokenizer, ITEMS, strategy="fast")


def _fixed_table(tokenizer, chosen: dict[str, float]) -> torch.Tensor:
    """Log-probs: ``chosen`` for its characters, the rest of the mass spread over other ids."""
    table = torch.empty(len(tokenizer), dtype=torch.float64)
    ids = {tokenizer.convert_tokens_to_ids(ch): lp for ch, lp in chosen.items()}
    rest = 1 - sum(math.exp(lp) for lp in ids.values())
    table.fill_(math.log(rest / (len(tokenizer) - len(ids))))
    for i, lp in ids.items():
        table[i] = lp
    return table


def test_acc_norm_ignores_the_shared_answer_lead(tiny_tokenizer):
    from tiny_models import build_fixed_logprob_lm

    # log p(token) whatever the context: the lead's letters are costly (format not learnt yet)
    lead_letters = {ch: -6.0 for ch in "Thenaswri:"}
    table = _fixed_table(
        tiny_tokenizer,
        {**lead_letters, " ": -3.0, "A": -3.0, "B": -3.0, ".": -3.0, "x": -3.0, "y": -4.0},
    )
    model = build_fixed_logprob_lm(table)
    item = MCItem("Q?\n", ["The answer is: A. x", "The answer is: B. yyyyyy"], 0, "s")
    # Scored and normalised: " A. x" = 5 x -3 = -15 -> -15/5 = -3.0;
    #                        " B. yyyyyy" = 4 x -3 + 6 x -4 = -36 -> -36/10 = -3.6: picks A.
    # Before, the lead "The answer is:" (2 spaces x -3 + 12 letters x -6 = -78) was scored too:
    # -93/19 = -4.89 vs -114/24 = -4.75 picked B, the longer option; the argmax was A either way.
    got = score_multiple_choice(model, tiny_tokenizer, [item])
    assert got.loglikelihoods[0] == pytest.approx([-15.0, -36.0], abs=1e-5)
    assert got.predictions_norm == [0] and got.acc_norm == 1.0
    assert got.predictions == [0] and got.accuracy == 1.0


@pytest.mark.parametrize(
    ("choices", "context", "continuations"),
    [
        (["The answer is: A. x", "The answer is: B. yy"], "p:The answer is:", [" A. x", " B. yy"]),
        (["A. x", "A. xy"], "p:A.", [" x", " xy"]),  # up to the last word boundary
        ([" four", " five"], "p:", [" four", " five"]),  # " f" ends inside a word: kept
        ([" red", " green"], "p:", [" red", " green"]),  # cloze: only the leading space shared
        (["Yes.", "Yes!"], "p:", ["Yes.", "Yes!"]),  # no word boundary in "Yes"
    ],
)
def test_scored_parts_moves_the_common_lead_to_a_word_boundary(choices, context, continuations):
    assert scored_parts(MCItem("p:", choices, 0, "s")) == (context, continuations)


def _one_by_one_after_start(model, start_id, tokenizer, item):
    """Each option alone: start token + its tokens through the model, summed log-probs."""
    out = []
    for choice in item.choices:
        ids = [start_id] + tokenizer(item.prompt + choice)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        out.append(sum(logp[k - 1, ids[k]].item() for k in range(1, len(ids))))
    return out


@pytest.mark.parametrize("strategy", ["packed", "flat"])
@pytest.mark.parametrize("declared_bos", [False, True])
def test_empty_prompt_scores_every_option_after_the_start_token(tiny_llama, strategy, declared_bos):
    from tiny_models import build_tiny_tokenizer

    # neither tokenizer adds a BOS to a text; the start token is the BOS id, else the EOS id
    tokenizer = build_tiny_tokenizer(bos_token="<s>" if declared_bos else None)
    start_id = tokenizer.bos_token_id if declared_bos else tokenizer.eos_token_id
    assert start_id == (1 if declared_bos else 2)
    items = [
        MCItem("", ["abc", "xyz"], 1, "empty"),  # different first tokens
        MCItem("", ["The answer is: A. x", "The answer is: B. yy"], 0, "lead"),  # -> context
    ]
    got = score_multiple_choice(tiny_llama, tokenizer, items, strategy=strategy)
    ref = [_one_by_one_after_start(tiny_llama, start_id, tokenizer, items[0])]
    assert max_abs_diff(got.loglikelihoods[:1], ref) < 1e-4
    # the second item has a context ("The answer is:"), so no start token is used
    ref_lead = naive_loglikelihoods(tiny_llama, tokenizer, items[1:])
    assert max_abs_diff(got.loglikelihoods[1:], ref_lead) < 1e-4


def test_no_start_token_is_refused_naming_the_item(tiny_llama):
    from tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(bos_token=None, eos_token=None)
    items = [MCItem("Q:", [" a", " b"], 0, "fine"), MCItem("", ["a", "b"], 0, "bare")]
    with pytest.raises(ValueError, match=r"item 1 \('bare'\): .*neither a BOS nor an EOS"):
        score_multiple_choice(tiny_llama, tokenizer, items)
    score_multiple_choice(tiny_llama, tokenizer, items[:1])  # a context token: no start needed
