"""Loading ``for_client`` factors into a real PEFT LoRA reproduces the intended delta."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import best_rank

from rblora.aggregation import ClientUpdate, aggregate

peft = pytest.importorskip("peft")


def llama_modules(model):
    """Base-model names and ``(d_out, d_in)`` of every q_proj / v_proj."""
    return {
        name: tuple(mod.weight.shape)
        for name, mod in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }


def clients_for(shapes, ranks, alphas, use_rslora, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            num_examples=10 * (k + 1),
            lora_alpha=alpha,
            use_rslora=use_rslora,
            factors={
                m: (torch.randn(r, d_in, generator=gen) * 0.2, torch.randn(d_out, r, generator=gen))
                for m, (d_out, d_in) in shapes.items()
            },
        )
        for k, (r, alpha) in enumerate(zip(ranks, alphas, strict=True))
    ]


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize(
    ("method", "rank", "alpha"),
    [("RB-LoRA", 4, 8.0), ("RB-LoRA", 2, 32.0), ("Weighted HETLoRA", 4, 16.0), ("FLoRA", 3, 8.0)],
)
def test_peft_layer_delta_equals_intended(method, rank, alpha, use_rslora):
    from tiny_models import build_tiny_llama

    base = build_tiny_llama(seed=0)
    shapes = llama_modules(base)
    assert len(shapes) == 4  # 2 layers x (q_proj 32x32, v_proj 16x32)
    clients = clients_for(shapes, [2, 4, 6], [16.0, 8.0, 32.0], use_rslora, seed=5)
    g = aggregate(method, clients, reduction="svd" if method == "FLoRA" else None)
    sent = g.for_client(rank=rank, lora_alpha=alpha, use_rslora=use_rslora)

    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora
    )
    model = peft.get_peft_model(base, config)
    inner = model.base_model.model  # the LlamaForCausalLM: names match the base model's
    with torch.no_grad():
        for name, (a, b) in sent.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    for name in shapes:
        got = inner.get_submodule(name).get_delta_weight("default")
        if g.reduction == "svd":
            want = best_rank(g.delta(name), rank)
        else:  # truncate: the first `rank` components of the global factors
            a_g, b_g = g.factors(name)
            want = b_g[:, :rank] @ a_g[:rank]
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
