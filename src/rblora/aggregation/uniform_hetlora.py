"""Uniform HETLoRA: zero-pad the factors to the largest rank and average them uniformly.

Source: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models" (EMNLP 2024), zero-padding aggregation, with equal client weights
(the seed's variant and its configs; the paper's own sparsity-weighted rule is :mod:`.hetlora`):

    Bbar = (1/K) sum_k pad_R(Bh_k),    Abar = (1/K) sum_k pad_R(A_k),    dW = Bbar @ Abar

(R = max r_k; ``Bh_k = s_k B_k``). Default redistribution: truncate (``A = Abar[:r]``,
``B = Bbar[:, :r] / s_r``).
"""

from __future__ import annotations

from .types import Method, count_share, weights_from_share

uniform_weights = weights_from_share(count_share)
"""``gamma: (K, R)`` float64, ``1 / K`` on each of the client's components (0 beyond its
rank, where its zero padding has nothing to weigh)."""


METHOD = Method(
    name="Uniform HETLoRA",
    weights=uniform_weights,
    share=count_share,
    form="padded",  # uniform mean of the padded factors (Abar: (R, d_in), Bbar: (d_out, R))
    default_reduction="truncate",
    reductions=("truncate", "svd", "merge"),
    exact_mean=False,
    ordered_components=True,
)
