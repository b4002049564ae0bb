"""Component Mean: each rank-one component averaged over the clients that hold it.

A new aggregation rule in one file (the tutorial, docs/tutorial-new-method.md): RB-LoRA without
its data weights. Component j (column j of ``Bh_k = s_k B_k``, row j of ``A_k``) of client k
gets the weight

    gamma_j(k) = 1 / |{k' : r_k' > j}|    for j < r_k (0-based), else 0,

so every client holding component j counts the same whatever its number of examples (RB-LoRA:
``n_k / sum_{k': r_k' > j} n_k'``). The global update is the weighted stack

    dW = sum_k sum_{j < r_k} gamma_j(k) * Bh_k[:, j] A_k[j]

and each client gets its best rank-r_k approximation back (SVD projection). With equal ranks it
is the plain mean of the clients' updates; with equal client sizes it is RB-LoRA.

This file is ``rblora compare`` with the method registered, so it runs against RB-LoRA as is:

    python examples/component_mean.py --methods "RB-LoRA,Component Mean" --seeds 1 \
        --output_dir ./outputs/tutorial -- --config embedded.yaml --data_path ./data/tutorial \
        --num_clients 3 --client_ranks 4,16,64 --num_communication_rounds 2
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from rblora.aggregation import Method
from rblora.aggregation.registry import register
from rblora.aggregation.types import weights_from_share


def component_mean_share(rank: int, num_examples: int, width: int) -> tuple[Tensor, Tensor]:
    """The weights as a share: raw weight 1 on each of the client's own components, and mass 1
    there too, so component j's denominator counts the clients that hold it; ``num_examples``
    is not used. ``(width,)`` float64 each."""
    held = (torch.arange(width) < rank).double()
    return held, held.clone()


component_mean_weights = weights_from_share(component_mean_share)
"""``gamma: (K, R)`` float64, ``gamma[k, j] = 1 / (clients with r > j)`` for ``j < r_k``, else 0
(``R = max r_k``)."""


METHOD = Method(
    name="Component Mean",
    weights=component_mean_weights,
    share=component_mean_share,  # a round folds each reply in as it arrives
    form="stack",  # dW = sum_k Bh_k diag(gamma_k) A_k, held as a stack of width sum r_k
    default_reduction="svd",  # each client gets the best rank-r_k approximation
    reductions=("svd",),
    exact_mean=True,  # equal ranks and sizes: gamma = 1/K, the mean of the dW_k
    ordered_components=False,
)


def main(argv: list[str] | None = None) -> int:
    """``rblora compare`` (same arguments) with Component Mean registered."""
    from rblora.experiments.compare import main as compare

    register(METHOD)
    return compare(argv)


if __name__ == "__main__":
    sys.exit(main())
