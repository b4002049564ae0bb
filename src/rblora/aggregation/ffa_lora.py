"""FFA-LoRA: A frozen at a shared random initialisation, only B trained, sent and averaged.

Source: Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning"
(ICLR 2024, arXiv 2403.12313). Every client's ``A`` is the same random matrix, fixed for the
whole run; clients train and upload ``B`` only, and the server averages it (``p_k = n_k / N``):

    Bbar = sum_k p_k Bh_k,    dW = Bbar @ A = sum_k p_k Bh_k @ A = sum_k p_k dW_k

(``Bh_k = s_k B_k``): the average of the factors *is* the average of the updates, because A is
shared, which is what makes the rule exact (FedIT's ``Bbar @ Abar`` is not) and its DP cheap:
only B is released, so a client's clipped term is its B alone (:mod:`.privacy`).

Heterogeneous ranks (our extension; the paper has one rank): A is drawn once per module from
the run's seed (:mod:`.frozen`) and a client of rank r uses its first r rows. Column j of B is
averaged over the clients that hold it,

    Bbar[:, j] = sum_{k: r_k > j} n_k Bh_k[:, j] / sum_{k: r_k > j} n_k,    dW = Bbar @ A[:R]

(R the widest rank), so with equal ranks it is the paper's rule, and the component weights are
RB-LoRA's ``gamma_j(k)``. Redistribution: truncate only, ``A = A[:r]`` (unchanged, never sent)
and ``B = Bbar[:, :r] / s_r``: svd and merge would replace the frozen A.
"""

from __future__ import annotations

from .types import ClientProtocol, Method, holder_share, weights_from_share

METHOD = Method(
    name="FFA-LoRA",
    weights=weights_from_share(holder_share),
    share=holder_share,
    form="padded",  # Bbar: (d_out, R) a per-component mean of Bh; A: (R, d_in) held as it is
    default_reduction="truncate",
    reductions=("truncate",),
    exact_mean=True,
    ordered_components=True,
    aliases=("FFA", "FFALoRA"),
    protocol=ClientProtocol(A="frozen"),
    reduction_note="its A stays frozen at the shared initialisation; svd or merge would replace it",
)
