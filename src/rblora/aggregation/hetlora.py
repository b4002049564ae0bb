"""HETLoRA as published: zero-padding with sparsity-weighted aggregation.

Source: Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models" (EMNLP 2024, arXiv 2401.06432), Fig. 2 and Sec. 3: the server
zero-pads every client's LoRA to the largest rank ``R`` and averages the padded factors with
weights given by the *sparsity* of each client's update, the Frobenius norm of its
reconstructed update ``dW_k = Bh_k @ A_k`` (``Bh_k = s_k B_k``), normalised over the round's
clients:

    S_k = ||Bh_k @ A_k||_F,    w_k = S_k / Z,    Z = sum_k S_k,
    Bbar = sum_k w_k pad_R(Bh_k),    Abar = sum_k w_k pad_R(A_k),    dW = Bbar @ Abar

module by module (each module's weights from that module's updates). A client whose update is
small (sparse, in the paper's words: a large rank that learned little, or noise) weighs less.
If every update of a module is exactly zero the weights are ``1 / K`` (ours: ``0 / 0`` is not
defined, and any weights give the zero update). Default redistribution: truncate, as the paper
(``A = Abar[:r]``, ``B = Bbar[:, :r] / s_r``).

This is not the seed's ``Uniform HETLoRA`` / ``Weighted HETLoRA``: those (and the seed's
configs ``uniform_hetlora.yaml``, ``weighted_hetlora.yaml``) are the zero-padding variants with
uniform or data-size weights and no sparsity weighting.

The paper's other half, the clients' local rank self-pruning (a regulariser on the norm of the
last components of the LoRA and a pruning rule), is local training, not aggregation: our
reading of it (the exact rule was not available to us) is :mod:`rblora.training.rank_pruning`,
on with ``--hetlora_lambda > 0``. The method declares it (``local_rank_pruning``), so a pruned
client's reply of smaller rank is accepted, and aggregated at its own rank and scale.

Client-level DP: refused (:attr:`~.types.Method.dp_note`). rblora's mechanism clips each
client's term to C and calibrates noise and accounting to "one client moves the release by at
most C", which fixed population weights give. The weights ``S_k / Z`` are normalised by the
round's own norms, so removing client j also moves every other client's weight (they grow by
``w_j`` in total): with terms clipped to C the release moves by up to ``2 w_j C <= 2C``, not C
(a test shows a move of sqrt(5) C / sqrt(2) > C). A mechanism calibrated to 2C (noise on the
normalised mean, the norms kept private) would be sound but is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .types import Method, count_share, weights_from_share


def update_norm(a: Tensor, bh: Tensor) -> float:
    """``||bh @ a||_F`` from the ``r x r`` Gram products, never the ``(d_out, d_in)`` matrix:
    ``||B A||_F^2 = trace((B^T B)(A A^T))`` (clamped at 0 against rounding)."""
    a64, b64 = a.detach().double(), bh.detach().double()
    sq = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    return max(sq, 0.0) ** 0.5


def sparsity_weights(As: Sequence[Tensor], Bhs: Sequence[Tensor]) -> Tensor:
    """``(K,)`` float64: ``w_k = ||Bh_k A_k||_F / sum_k' ||Bh_k' A_k'||_F`` (``1 / K`` each if
    every update is zero)."""
    norms = torch.tensor([update_norm(a, bh) for a, bh in zip(As, Bhs, strict=True)],
                         dtype=torch.float64)  # fmt: skip
    total = float(norms.sum())
    if total == 0.0:
        return torch.full((len(As),), 1.0 / len(As), dtype=torch.float64)
    return norms / total


METHOD = Method(
    name="HETLoRA",
    # by ranks and sizes alone the weights are not defined; update_weights replaces them
    weights=weights_from_share(count_share),
    update_weights=sparsity_weights,
    form="padded",  # sparsity-weighted mean of the padded factors: Abar (R, d_in), Bbar (d_out, R)
    default_reduction="truncate",
    reductions=("truncate", "svd", "merge"),
    exact_mean=False,
    ordered_components=True,
    local_rank_pruning=True,
    aliases=("HetLoRA-published", "HETLoRA (published)", "Sparsity HETLoRA"),
    dp_note=(
        "its sparsity weights ||dW_k|| / sum_k' ||dW_k'|| are normalised by the round's own "
        "norms, so one client moves every weight and the release by up to 2C, while the DP "
        "noise and accounting assume C (fixed weights); use Weighted HETLoRA for DP"
    ),
)
