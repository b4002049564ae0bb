"""FlexLoRA: the example-weighted sum of the clients' full updates, SVD-truncated per client.

Source: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources" (NeurIPS 2024), with ``p_k = n_k / N``:

    dW = sum_k p_k dW_k = sum_k p_k Bh_k @ A_k,    client k receives the best rank-r_k
    approximation of dW (truncated SVD)

Held exactly in factored form as the weighted stack ``B_s = [Bh_1 ... Bh_K]``,
``A_s = [p_1 A_1; ...; p_K A_K]`` (width S = sum r_k), so the SVD runs on the factors
(QR of both stacks, SVD of the S x S core) and ``d_out x d_in`` is never formed at Llama size.
The same global update as FLoRA's; FLoRA merges it into the base, FlexLoRA redistributes it.
"""

from __future__ import annotations

from . import flora
from .types import Method

METHOD = Method(
    name="FlexLoRA",
    weights=flora.data_weights,  # the same exact weighted stack as FLoRA's;
    share=flora.data_share,
    form="stack",  # only the redistribution differs
    default_reduction="svd",
    reductions=("svd", "threshold"),
    exact_mean=True,
    ordered_components=False,
)
