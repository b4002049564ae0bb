"""One client's local training of a causal LM; knows nothing about federation."""

from rblora.training.batching import check_targets
from rblora.training.config import TrainConfig
from rblora.training.loop import LocalResult, TrainingDiverged, train_local
from rblora.training.loss import causal_lm_loss_sum, linear_cross_entropy
from rblora.training.tokenize import IGNORE_INDEX, tokenize_records

__all__ = [
    "IGNORE_INDEX",
    "LocalResult",
    "TrainConfig",
    "TrainingDiverged",
    "causal_lm_loss_sum",
    "check_targets",
    "linear_cross_entropy",
    "tokenize_records",
    "train_local",
]
