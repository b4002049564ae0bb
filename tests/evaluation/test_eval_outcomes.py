"""Per-item outcomes: ids that follow the item, and outcomes that make up the round's figures."""

from __future__ import annotations

import json

import torch

from rblora.evaluation import EvalConfig, MCItem, encode_evaluation, evaluate_encoded
from rblora.evaluation.classification import evaluate_classifier
from rblora.evaluation.multiple_choice import summarize
from rblora.evaluation.outcomes import image_item_ids, mc_item_ids

ITEMS = [
    MCItem("Q: 1+1?\nA:", [" 2", " 3"], 0, "math"),
    MCItem("Q: sky?\nA:", [" blue", " green", " red"], 0, "nature"),
    MCItem("Q: 2+2?\nA:", [" 4", " five", " 22"], 2, "math"),
]


def test_an_items_id_follows_the_item_not_its_place():
    ids = mc_item_ids(ITEMS)
    assert len(set(ids)) == 3 and all(len(i) == 16 for i in ids)
    assert mc_item_ids(ITEMS[::-1]) == ids[::-1]  # another order or subset: the same ids
    assert mc_item_ids(ITEMS[1:2]) == ids[1:2]
    other_answer = MCItem("Q: 1+1?\nA:", [" 2", " 3"], 1, "math")
    other_choices = MCItem("Q: 1+1?\nA:", [" 2", " 4"], 0, "math")
    assert mc_item_ids([other_answer])[0] != ids[0] != mc_item_ids([other_choices])[0]
    assert mc_item_ids([ITEMS[0], ITEMS[1], ITEMS[0]]) == [ids[0], ids[1], f"{ids[0]}~2"]


def test_image_ids_follow_pixels_and_label():
    pixels = torch.arange(4 * 1 * 2 * 2, dtype=torch.uint8).reshape(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 1, 0])
    ids = image_item_ids(pixels, labels)
    assert len(set(ids)) == 4
    assert image_item_ids(pixels[[2, 0]], labels[[2, 0]]) == [ids[2], ids[0]]
    assert image_item_ids(pixels[:1], torch.tensor([1]))[0] != ids[0]


def test_multiple_choice_outcomes_make_up_accuracy_and_acc_norm(tiny_llama, tiny_tokenizer):
    config = EvalConfig(batch_tokens=64, cutoff_len=256)
    encoded = encode_evaluation(tiny_tokenizer, {"mc": ITEMS}, None, None, config, context=256)
    plain = evaluate_encoded(tiny_llama, encoded, config)
    assert "items" not in plain  # only when asked
    out = evaluate_encoded(tiny_llama, encoded, config, items=True)
    json.dumps(out)
    outcomes = out["items"]["mc"]
    assert outcomes["ids"] == mc_item_ids(ITEMS)
    assert sum(outcomes["accuracy"]) / 3 == out["suites"]["mc"]["accuracy"]
    assert sum(outcomes["acc_norm"]) / 3 == out["suites"]["mc"]["acc_norm"]


def test_outcomes_of_hand_made_log_likelihoods():
    # item 0: option 0 wins (right); item 1: option 1 wins (wrong, answer 0);
    # item 2: raw sum picks option 0 (wrong), per character option 2 (right: " 22" is 3 chars)
    lls = [[-1.0, -2.0], [-5.0, -1.0, -9.0], [-2.0, -9.0, -2.1]]
    from rblora.evaluation.multiple_choice import mc_outcomes

    outcomes = mc_outcomes(ITEMS, summarize(ITEMS, lls))
    assert outcomes["accuracy"] == [1, 0, 0] and outcomes["acc_norm"] == [1, 0, 1]


class _Fixed(torch.nn.Module):
    """Logits ``scores[i]`` for the image whose first pixel is ``i``."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores), requires_grad=False)

    def forward(self, pixel_values):
        class Out:
            logits = self.scores[pixel_values[:, 0, 0, 0].long()]

        return Out()


def test_image_outcomes_are_top1_hits():
    labels = torch.tensor([0, 1, 2, 1])
    pixels = torch.arange(4, dtype=torch.uint8).reshape(4, 1, 1, 1)
    scores = [[3.0, 0, 0], [0, 0, 1.0], [0, 0, 2.0], [0, 5.0, 0]]  # predictions 0, 2, 2, 1
    ids = image_item_ids(pixels, labels)
    out = evaluate_classifier(
        _Fixed(scores), lambda idx: pixels[idx].float(), labels, ["a", "b", "c"], batch_size=3,
        ids=ids,
    )  # fmt: skip
    assert out["items"]["test"] == {"ids": ids, "accuracy": [1, 0, 1, 1]}
    assert out["suites"]["test"]["accuracy"] == 0.75
    assert "items" not in evaluate_classifier(
        _Fixed(scores), lambda idx: pixels[idx].float(), labels, ["a", "b", "c"]
    )
