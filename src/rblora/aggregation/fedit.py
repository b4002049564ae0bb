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

from torch import Tensor

from .flora import data_weights
from .types import Method, data_share


def same_rank_data_weights(ranks: Sequence[int], num_examples: Sequence[int]) -> Tensor:
    """``gamma: (K, r)`` float64, ``gamma[k, j] = p_k = n_k / sum n``; ValueError unless every
    client has the same rank ``r``."""
    if len(set(ranks)) > 1:
        raise ValueError(
            f"FedIT averages A and B and needs every client at the same rank; got ranks "
            f"{list(ranks)} (for heterogeneous ranks use Weighted HETLoRA, its zero-padded form)"
        )
    return data_weights(ranks, num_examples)


METHOD = Method(
    name="FedIT",
    weights=same_rank_data_weights,
    share=data_share,
    form="padded",  # data-weighted mean of the factors (Abar: (r, d_in), Bbar: (d_out, r))
    default_reduction="truncate",
    reductions=("truncate", "svd"),
    exact_mean=False,
    ordered_components=True,
    homogeneous_ranks=True,
    aliases=("FedAvg",),
)
