"""Weighted HETLoRA: zero-pad the factors to the largest rank and average them by data size.

Source: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models"
(EMNLP 2024), zero-padding aggregation with FedAvg weights ``p_k = n_k / N``:

    Bbar = sum_k p_k pad_R(Bh_k),    Abar = sum_k p_k pad_R(A_k),    dW = Bbar @ Abar

Default redistribution: truncate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .linalg import padded_component_sum
from .types import FactorPair, Method


def combine(As: Sequence[Tensor], Bhs: Sequence[Tensor], num_examples: Sequence[int]) -> FactorPair:
    """Data-weighted mean of the padded factors: ``(Abar: (R, d_in), Bbar: (d_out, R))``."""
    rank = max(a.shape[0] for a in As)
    p = torch.tensor(list(num_examples), dtype=torch.float64)
    gamma = (p / p.sum())[:, None].expand(len(As), rank)
    return padded_component_sum(As, Bhs, gamma)


METHOD = Method(
    name="Weighted HETLoRA",
    combine=combine,
    default_reduction="truncate",
    reductions=("truncate", "svd", "merge"),
    exact_mean=False,
    ordered_components=True,
)
