"""Uniform HETLoRA: zero-pad the factors to the largest rank and average them uniformly.

Source: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models" (EMNLP 2024), zero-padding aggregation, with equal client weights:

    Bbar = (1/K) sum_k pad_R(Bh_k),    Abar = (1/K) sum_k pad_R(A_k),    dW = Bbar @ Abar

(R = max r_k; ``Bh_k = s_k B_k``). Default redistribution: truncate (``A = Abar[:r]``,
``B = Bbar[:, :r] / s_r``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .linalg import padded_component_sum
from .types import FactorPair, Method


def combine(As: Sequence[Tensor], Bhs: Sequence[Tensor], num_examples: Sequence[int]) -> FactorPair:
    """Uniform mean of the padded factors: ``(Abar: (R, d_in), Bbar: (d_out, R))``."""
    rank = max(a.shape[0] for a in As)
    gamma = torch.full((len(As), rank), 1.0 / len(As), dtype=torch.float64)
    return padded_component_sum(As, Bhs, gamma)


METHOD = Method(
    name="Uniform HETLoRA",
    combine=combine,
    default_reduction="truncate",
    reductions=("truncate", "svd", "merge"),
    exact_mean=False,
    ordered_components=True,
)
