"""RB-LoRA (factor): the rank-balanced weights applied to each factor separately.

Source: the second reading of Ha, Oh, Jeon, "RB-LoRA" (Findings of EACL 2026) in DESIGN.md
section 2, shipped so experiments can compare it with :mod:`.rb_lora`. With ``gamma_j(k)`` from
:func:`.rb_lora.rank_balanced_weights`:

    B_g[:, j] = sum_k gamma_j(k) Bh_k[:, j],    A_g[j] = sum_k gamma_j(k) A_k[j],    dW = B_g @ A_g

(rank <= R = max r_k), redistributed by SVD projection (always). Equal ranks and sizes give the
product of the mean factors, not the mean update.
"""

from __future__ import annotations

from .rb_lora import rank_balanced_weights
from .types import Method, holder_share

METHOD = Method(
    name="RB-LoRA (factor)",
    weights=rank_balanced_weights,
    share=holder_share,
    form="padded",  # rank-balanced mean of the padded factors (A_g: (R, d_in), B_g: (d_out, R))
    default_reduction="svd",
    reductions=("svd",),
    exact_mean=False,
    ordered_components=True,
)
