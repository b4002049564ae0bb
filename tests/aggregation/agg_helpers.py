"""Helpers for the aggregation tests: random client updates from an explicit seed."""

from __future__ import annotations

import torch

from rblora.aggregation import ClientUpdate

# Two modules; (24, 20) and (16, 20) keep S = sum r_k below min(d_out, d_in) for the default
# ranks, so the factored (not the dense) SVD path is exercised.
SHAPES = {"model.layers.0.self_attn.q_proj": (24, 20), "model.layers.0.self_attn.v_proj": (16, 20)}


def make_clients(
    ranks,
    sizes,
    alphas=None,
    use_rslora=False,
    shapes=None,
    seed=0,
    dtype=torch.float64,
    method=None,
):
    """One ClientUpdate per rank: A ~ N(0, 1/d_in), B ~ N(0, 1) so every update is generic.
    ``method``: if its client protocol fixes A in round 1 (FFA-LoRA, RoLoRA), every client's A
    is the first r_k rows of one shared draw per module (as a run gives them); else each client
    draws its own."""
    from rblora.aggregation import get_method

    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES if shapes is None else shapes
    shared = None
    if method is not None and "A" in get_method(method).protocol.at(1).fixed:
        shared = {
            m: torch.randn(max(ranks), d_in, generator=gen, dtype=dtype) / d_in**0.5
            for m, (_, d_in) in shapes.items()
        }
    alphas = [16.0] * len(ranks) if alphas is None else alphas
    clients = []
    for k, (r, n, alpha) in enumerate(zip(ranks, sizes, alphas, strict=True)):
        factors = {
            m: (
                torch.randn(r, d_in, generator=gen, dtype=dtype) / d_in**0.5
                if shared is None
                else shared[m][:r].clone(),
                torch.randn(d_out, r, generator=gen, dtype=dtype),
            )
            for m, (d_out, d_in) in shapes.items()
        }
        clients.append(
            ClientUpdate(
                num_examples=n,
                lora_alpha=alpha,
                factors=factors,
                use_rslora=use_rslora,
                client_id=f"c{k}",
            )
        )
    return clients


def client_delta(u: ClientUpdate, module: str) -> torch.Tensor:
    """``dW_k = s_k B_k A_k`` computed directly (independent of the library's scale folding)."""
    a, b = u.factors[module]
    r = a.shape[0]
    s = u.lora_alpha / (r**0.5 if u.use_rslora else r)
    return s * (b @ a)


def best_rank(delta: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation from a dense float64 SVD (the Eckart-Young reference)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def fit(method: str, ranks: list[int]) -> list[int]:
    """``ranks`` as ``method`` accepts them: all equal to the largest for a method that needs
    homogeneous ranks (FedIT), unchanged otherwise."""
    from rblora.aggregation import get_method

    return [max(ranks)] * len(ranks) if get_method(method).homogeneous_ranks else list(ranks)
