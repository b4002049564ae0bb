"""FedSA-LoRA: A shared and averaged, B trained and kept by each client, never sent.

Source: Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning" (ICLR 2025, arXiv 2410.01463). The paper finds that the A matrices learn
what is general across clients and the B matrices what is client-specific, so clients train
both, upload ``A`` alone, and the server averages it (``p_k = n_k / N``):

    Abar = sum_k p_k A_k

while each client keeps its own ``B_k`` from one round to the next (a client that has never
trained starts B at zero, as PEFT does). Client k's model after a round is
``W0 + s_k B_k @ Abar[:r_k]``, its own: there is no global model (the server never sees a B),
so the method is scored by personalised evaluation (``--eval_personalized``, which this method
requires), each client's model on its own held-out data.

Heterogeneous ranks (our extension; the paper has one rank): row j of A is averaged over the
clients that hold it,

    Abar[j] = sum_{k: r_k > j} n_k A_k[j] / sum_{k: r_k > j} n_k

(RB-LoRA's ``gamma_j(k)``, as FFA-LoRA averages B), so with equal ranks it is the paper's rule;
a client of rank r starts from ``Abar[:r]``. Redistribution: truncate only (svd or merge would
replace the shared A by another basis, no longer the one the clients' B were trained against).

Client-level DP: only A is released, so a client's clipped term is its A's contribution
``diag(g_k) A_k`` alone and only ``Abar`` is noised (:mod:`.privacy`). Secure aggregation: the
rule is a weighted sum of what clients upload, so it is compatible.
"""

from __future__ import annotations

from .types import ClientProtocol, Method, holder_share, weights_from_share

METHOD = Method(
    name="FedSA-LoRA",
    weights=weights_from_share(holder_share),
    share=holder_share,
    form="padded",  # Abar: (R, d_in) a per-component mean of A; B: the clients' own, zeros here
    default_reduction="truncate",
    reductions=("truncate",),
    exact_mean=False,  # there is no global update to be a mean of (B stays on the clients)
    ordered_components=True,
    aliases=("FedSA", "FedSALoRA"),
    protocol=ClientProtocol(B="local"),
    reduction_note="its clients keep their own B, trained against the shared A; svd or merge "
    "would replace that A",
)
