"""Weighted HETLoRA: zero-pad the factors to the largest rank and average them by data size.

Source: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models"
(EMNLP 2024), zero-padding aggregation with FedAvg weights ``p_k = n_k / N`` (the seed's
variant and its configs; the paper's own sparsity-weighted rule is :mod:`.hetlora`):

    Bbar = sum_k p_k pad_R(Bh_k),    Abar = sum_k p_k pad_R(A_k),    dW = Bbar @ Abar

Default redistribution: truncate.
"""

from __future__ import annotations

from .flora import data_weights
from .types import Method, data_share

METHOD = Method(
    name="Weighted HETLoRA",
    weights=data_weights,
    share=data_share,
    form="padded",  # data-weighted mean of the padded factors (Abar: (R, d_in), Bbar: (d_out, R))
    default_reduction="truncate",
    reductions=("truncate", "svd", "merge"),
    exact_mean=False,
    ordered_components=True,
)
