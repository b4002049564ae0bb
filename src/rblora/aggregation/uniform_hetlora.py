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

from .types import Method


def uniform_weights(ranks: Sequence[int], num_examples: Sequence[int]) -> Tensor:
    """``gamma: (K, R)`` float64, every entry ``1 / K``."""
    return torch.full((len(ranks), max(ranks)), 1.0 / len(ranks), dtype=torch.float64)


METHOD = Method(
    name="Uniform HETLoRA",
    weights=uniform_weights,
    form="padded",  # uniform mean of the padded factors (Abar: (R, d_in), Bbar: (d_out, R))
    default_reduction="truncate",
    reductions=("truncate", "svd", "merge"),
    exact_mean=False,
    ordered_components=True,
)
