"""Per-round evaluation: multiple-choice log-likelihood accuracy and held-out response loss.

``evaluate_round`` is what the federated loop calls on the global model once per round;
``score_multiple_choice`` and ``response_loss`` are its two parts; ``load_mc_file``,
``mmlu_items`` and ``task_items`` build the multiple-choice suites.
"""

from rblora.evaluation.config import DEFAULTS, EvalConfig
from rblora.evaluation.items import MCItem, load_mc_file, mmlu_items, read_records, task_items
from rblora.evaluation.loss import response_loss
from rblora.evaluation.multiple_choice import (
    MCResult,
    SubjectScore,
    score_multiple_choice,
    scored_parts,
)
from rblora.evaluation.round import evaluate_round

__all__ = [
    "DEFAULTS",
    "EvalConfig",
    "MCItem",
    "MCResult",
    "SubjectScore",
    "evaluate_round",
    "load_mc_file",
    "mmlu_items",
    "read_records",
    "response_loss",
    "score_multiple_choice",
    "scored_parts",
    "task_items",
]
