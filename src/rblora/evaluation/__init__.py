"""Per-round evaluation: multiple-choice log-likelihood accuracy and held-out response loss.

``evaluate_round`` evaluates a model once: every suite and the held-out loss;
``score_multiple_choice`` and ``response_loss`` are its two parts. A run that evaluates every
round tokenizes once with ``encode_evaluation`` and calls ``evaluate_encoded`` each round.
``load_mc_file``, ``mmlu_items`` and ``task_items`` build the multiple-choice suites.
"""

from rblora.evaluation.config import DEFAULTS, EvalConfig
from rblora.evaluation.items import MCItem, load_mc_file, mmlu_items, read_records, task_items
from rblora.evaluation.loss import EncodedLoss, encode_loss, loss_of_encoded, response_loss
from rblora.evaluation.multiple_choice import (
    EncodedSuite,
    MCResult,
    SubjectScore,
    encode_suite,
    score_encoded,
    score_multiple_choice,
    scored_parts,
)
from rblora.evaluation.round import (
    EncodedEvaluation,
    encode_evaluation,
    evaluate_encoded,
    evaluate_round,
)

__all__ = [
    "DEFAULTS",
    "EncodedEvaluation",
    "EncodedLoss",
    "EncodedSuite",
    "EvalConfig",
    "MCItem",
    "MCResult",
    "SubjectScore",
    "encode_evaluation",
    "encode_loss",
    "encode_suite",
    "evaluate_encoded",
    "evaluate_round",
    "load_mc_file",
    "loss_of_encoded",
    "mmlu_items",
    "read_records",
    "response_loss",
    "score_encoded",
    "score_multiple_choice",
    "scored_parts",
    "task_items",
]
