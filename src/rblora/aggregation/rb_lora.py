"""RB-LoRA: rank-balanced aggregation of rank-one components.

Source: Ha, Oh, Jeon, "RB-LoRA: Rank-Balanced Aggregation for Low-Rank Adaptation with Federated
Fine-Tuning", Findings of EACL 2026 (read through its project page; see DESIGN.md section 2).

Component j (column j of ``Bh_k = s_k B_k``, row j of ``A_k``) of client k gets the weight
``gamma_j(k) = alpha_k * beta_j`` with ``alpha_k = n_k / N`` and
``beta_j = N / sum_{k: r_k > j} n_k`` (0-based j), i.e.
``gamma_j(k) = n_k / sum_{k': r_k' > j} n_k'``; for every j the weights of the clients that have
component j sum to 1. The global update is

    dW = sum_k sum_{j < r_k} gamma_j(k) * Bh_k[:, j] A_k[j]

held as a weighted stack of width S = sum r_k, redistributed by SVD projection (always).
"""

from __future__ import annotations

from .types import Method, holder_share, weights_from_share

rank_balanced_weights = weights_from_share(holder_share)
"""``gamma: (K, R)`` float64, ``gamma[k, j] = n_k / sum_{k': r_k' > j} n_k'`` for ``j < r_k``,
else 0 (``R = max r_k``): raw and mass ``n_k`` on each of the client's own components."""


METHOD = Method(
    name="RB-LoRA",
    weights=rank_balanced_weights,
    share=holder_share,
    form="stack",  # the rank-balanced weighted stack (A_s: (S, d_in), B_s: (d_out, S))
    default_reduction="svd",
    reductions=("svd", "threshold"),
    exact_mean=True,
    ordered_components=False,
)
