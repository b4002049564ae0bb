"""FLoRA: stacking-based aggregation, exact weighted mean of the client updates.

Source: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models
with Heterogeneous Low-Rank Adaptations" (NeurIPS 2024), stacking with ``p_k = n_k / N``:

    B_s = [Bh_1 ... Bh_K],    A_s = [p_1 A_1; ...; p_K A_K],    dW = B_s @ A_s = sum_k p_k dW_k

(width S = sum r_k). Default redistribution: merge (the paper's protocol: the update goes into the
frozen base weights and every client restarts from a fresh LoRA); ``svd`` gives each client the
best rank-r approximation instead. ``truncate`` keeps the first r stacked components, which
depends on client order; it exists only to reproduce seed configurations.
"""

from __future__ import annotations

from .types import Method, data_share, weights_from_share

data_weights = weights_from_share(data_share)
"""``gamma: (K, R)`` float64, ``gamma[k, j] = p_k = n_k / sum n`` for each of the client's
components (0 beyond its rank)."""


METHOD = Method(
    name="FLoRA",
    weights=data_weights,
    share=data_share,
    form="stack",  # the data-weighted stack (A_s: (S, d_in), B_s: (d_out, S))
    default_reduction="merge",
    reductions=("merge", "svd", "truncate", "threshold"),
    exact_mean=True,
    ordered_components=False,
)
