"""FLoRIST: FlexLoRA's exact sum, redistributed by singular-value energy thresholding.

Source: Ramesh, Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate
Federated Fine-Tuning of Large Language Models" (MLSys 2026, arXiv 2506.09199). The server
stacks the clients' factors with ``p_k = n_k / N`` (FLoRA's stack, FlexLoRA's sum),

    dW = [Bh_1 ... Bh_K] @ [p_1 A_1; ...; p_K A_K] = sum_k p_k Bh_k @ A_k,

takes its SVD in the compact space of the two stacks (never the ``d_out x d_in`` matrix;
rblora's :class:`.linalg.FactoredSVD` does the same for every stack method), and keeps per
module the fewest directions holding a fraction ``tau`` of the energy,

    k = min{k : sigma_1^2 + ... + sigma_k^2 >= tau * sum_i sigma_i^2},
    B = U[:, :k] diag(sigma[:k]),    A = V[:, :k]^T

(:func:`.linalg.energy_rank`). The authors' code (the repository its README calls the
official implementation) computes this energy from squared singular values, one ``k`` per
module, and gives the singular values to B, as here; its default ``tau`` is 0.9 and its tables
tune 0.80-0.99 per model and data set. ``--svd_energy`` sets ``tau`` (rblora's default 0.99).

This is the ``threshold`` redistribution (:data:`.types.REDUCTIONS`) of FlexLoRA's sum, under
the paper's name, so that a comparison can list it as a method. Two choices are ours:
a client of rank ``r < k`` starts from its best rank-r approximation (the paper gives every
client the same rank-k pair), and the global model that is evaluated and saved is the exact
sum, not its rank-k cut (at ``tau = 0.99`` the cut keeps 99% of the update's energy).
``--reduction_method threshold`` gives the same cut to RB-LoRA and FLoRA.
"""

from __future__ import annotations

from . import flora
from .types import Method

METHOD = Method(
    name="FLoRIST",
    weights=flora.data_weights,  # FlexLoRA's (and FLoRA's) exact data-weighted stack
    share=flora.data_share,
    form="stack",
    default_reduction="threshold",
    reductions=("threshold",),
    exact_mean=True,
    ordered_components=False,
    reduction_note="it is FlexLoRA's sum with the threshold cut; svd is FlexLoRA, merge FLoRA",
)
