"""FedIT: FedAvg of the LoRA factors, for clients that all have the same rank.

Source: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning"
(ICASSP 2024), FedAvg of A and B separately with ``p_k = n_k / N``:

    Bbar = sum_k p_k Bh_k,    Abar = sum_k p_k A_k,    dW = Bbar @ Abar

(``Bh_k = s_k B_k``). The classic baseline the heterogeneous methods start from; note that
``Bbar @ Abar`` is not the mean of the clients' updates. Heterogeneous ranks are refused (there
is no common shape to average); zero-padding them is Weighted HETLoRA. Redistribution:
truncate (every client gets the averaged factors back, its scale divided out) or svd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .linalg import padded_component_sum
from .types import FactorPair, Method


def combine(As: Sequence[Tensor], Bhs: Sequence[Tensor], num_examples: Sequence[int]) -> FactorPair:
    """Data-weighted mean of the factors: ``(Abar: (r, d_in), Bbar: (d_out, r))``."""
    ranks = sorted({a.shape[0] for a in As})
    if len(ranks) > 1:
        raise ValueError(
            f"FedIT averages A and B and needs every client at the same rank; got ranks "
            f"{[a.shape[0] for a in As]} (for heterogeneous ranks use Weighted HETLoRA, its "
            "zero-padded form)"
        )
    p = torch.tensor(list(num_examples), dtype=torch.float64)
    gamma = (p / p.sum())[:, None].expand(len(As), ranks[0])
    return padded_component_sum(As, Bhs, gamma)


METHOD = Method(
    name="FedIT",
    combine=combine,
    default_reduction="truncate",
    reductions=("truncate", "svd"),
    exact_mean=False,
    ordered_components=True,
    homogeneous_ranks=True,
    aliases=("FedAvg",),
)
