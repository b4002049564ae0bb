"""FedEx-LoRA: FedAvg of A and B, and the residual that makes it exact folded into the base.

Source: Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Large Language Models" (ACL 2025; the arXiv version ends "of
Foundation Models"). The server averages the factors as
FedIT does, ``Bbar = sum_k p_k Bh_k``, ``Abar = sum_k p_k A_k`` (``Bh_k = s_k B_k``,
``p_k = n_k / N``), sends them back, and adds what their product misses,

    R = sum_k p_k Bh_k @ A_k - Bbar @ Abar,        W0 <- W0 + R,

to the frozen base weights, so that the global model ``W0 + R + Bbar @ Abar`` is exactly
``W0 + sum_k p_k dW_k``: the mean of the clients' updates, not FedIT's product of means. Every
client trains its next round from ``(Abar, Bbar)`` on the updated base.

Heterogeneous ranks (our extension; the paper has one rank): zero-pad, as Weighted HETLoRA
does, ``Bbar = sum_k p_k pad(Bh_k)``, ``Abar = sum_k p_k pad(A_k)`` (width R the widest rank),
and fold the same residual: the global model is still exactly ``sum_k p_k dW_k``. A client of
rank r starts from the first r components (``A = Abar[:r]``, ``B = Bbar[:, :r] / s_r``), which
is the whole adapter only for the widest clients. Redistribution: truncate only (svd would
rotate the factors the residual was computed against, merge would make the residual moot).

What it costs: the residual is dense, of rank at most ``sum_k r_k + R`` a module a round; the
server folds it into a running total (:class:`.running.UpdateSum`, at most one dense matrix a
module) which every client must receive before it trains, as FLoRA's merged total is, counted
the same way in ``bytes_down`` (``min(k (d_in + d_out), d_in d_out)`` values a module for
``k`` components of residual it has not received). Under client-level DP a client's term is
``(diag(g_k) A_k, Bh_k diag(g_k), Bh_k diag(g_k) A_k)``: the two factors and the dense weighted
sum are released with noise and the residual is computed from the noised releases
(post-processing), so the base total becomes dense (:mod:`.privacy`).
"""

from __future__ import annotations

from .types import Method, data_share, weights_from_share

METHOD = Method(
    name="FedEx-LoRA",
    weights=weights_from_share(data_share),
    share=data_share,
    form="padded",  # the factors clients start from; the residual: the stack of the same weights
    default_reduction="truncate",
    reductions=("truncate",),
    exact_mean=True,
    ordered_components=True,
    aliases=("FedEx", "FedExLoRA"),
    residual=True,
    reduction_note="its residual is computed against the averaged factors clients start from; "
    "svd would rotate them and merge would leave no factors",
)
