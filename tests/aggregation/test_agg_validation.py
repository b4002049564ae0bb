"""Every bad input raises ValueError naming the client, the module and the problem."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import make_clients

from rblora.aggregation import ClientUpdate, aggregate, default_reduction

Q = "model.layers.0.self_attn.q_proj"


def with_factors(u, **changes):
    """A copy of ``u`` with some fields or module factors replaced."""
    factors = dict(u.factors)
    factors.update(changes.pop("factors", {}))
    fields = {"num_examples": u.num_examples, "lora_alpha": u.lora_alpha, "client_id": u.client_id}
    fields.update(changes)
    return ClientUpdate(factors=factors, **fields)


@pytest.fixture
def pair():
    return make_clients([2, 4], [10, 30])


def test_unknown_method_lists_valid_names(pair):
    with pytest.raises(ValueError, match=r"unknown aggregation method 'FedAvgX'.*RB-LoRA.*FLoRA"):
        aggregate("FedAvgX", pair)
    with pytest.raises(ValueError, match="unknown aggregation method"):
        default_reduction("nope")


def test_bad_reductions(pair):
    with pytest.raises(ValueError, match=r"RB-LoRA does not support reduction 'truncate'.*svd"):
        aggregate("RB-LoRA", pair, reduction="truncate")
    with pytest.raises(ValueError, match="RB-LoRA does not support reduction 'merge'"):
        aggregate("rb_lora", pair, reduction="merge")
    with pytest.raises(ValueError, match=r"unknown reduction 'best'.*svd, truncate, merge"):
        aggregate("FLoRA", pair, reduction="best")


def test_empty_list():
    with pytest.raises(ValueError, match="empty list"):
        aggregate("RB-LoRA", [])


def test_different_module_sets(pair):
    a, b = pair[1].factors[Q]
    extra = with_factors(pair[1], factors={"model.layers.9.mlp": (a, b)})
    text = r"client 1 \(id 'c1'\).*unexpected \['model.layers.9.mlp'\]"
    with pytest.raises(ValueError, match=text):
        aggregate("RB-LoRA", [pair[0], extra])
    fewer = ClientUpdate(num_examples=5, lora_alpha=8.0, factors={Q: pair[1].factors[Q]})
    with pytest.raises(ValueError, match=r"client 1: module set.*missing \['model.layers.0"):
        aggregate("FLoRA", [pair[0], fewer])


def test_inconsistent_dimensions(pair):
    a, b = pair[1].factors[Q]
    for bad, text in (((a[:, :-1], b), r"\(24, 19\)"), ((a, b[:-1]), r"\(23, 20\)")):
        with pytest.raises(ValueError, match=rf"client 1.*'{Q}'.*{text} differs from client 0"):
            aggregate("RB-LoRA", [pair[0], with_factors(pair[1], factors={Q: bad})])


def test_rank_out_of_range(pair):
    zero = (torch.zeros(0, 20), torch.zeros(24, 0))
    with pytest.raises(ValueError, match=rf"client 0.*'{Q}'.*rank 0 is outside 1..min.*1..20"):
        aggregate("RB-LoRA", [with_factors(pair[0], factors={Q: zero})])
    big = (torch.randn(21, 20), torch.randn(24, 21))
    with pytest.raises(ValueError, match=rf"client 1.*'{Q}'.*rank 21 is outside"):
        aggregate("RB-LoRA", [pair[0], with_factors(pair[1], factors={Q: big})])


def test_a_b_rank_disagreement(pair):
    bad = (torch.randn(3, 20), torch.randn(24, 4))
    with pytest.raises(ValueError, match=rf"client 1.*'{Q}'.*A has rank 3.*B has rank 4"):
        aggregate("RB-LoRA", [pair[0], with_factors(pair[1], factors={Q: bad})])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", [0, 1])
def test_non_finite_values(pair, value, which):
    a, b = (t.clone() for t in pair[1].factors[Q])
    (a, b)[which][0, 0] = value
    name = "AB"[which]
    with pytest.raises(ValueError, match=rf"client 1.*'{Q}'.*{name} contains NaN or inf"):
        aggregate("Weighted HETLoRA", [pair[0], with_factors(pair[1], factors={Q: (a, b)})])


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_num_examples(pair, n):
    with pytest.raises(ValueError, match=rf"client 0 \(id 'c0'\): num_examples.*>= 1, got {n}"):
        aggregate("FLoRA", [with_factors(pair[0], num_examples=n), pair[1]])


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_lora_alpha(pair, alpha):
    with pytest.raises(ValueError, match=r"client 1 \(id 'c1'\): lora_alpha must be"):
        aggregate("RB-LoRA", [pair[0], with_factors(pair[1], lora_alpha=alpha)])


def test_not_tensors_or_not_pairs(pair):
    with pytest.raises(ValueError, match=r"client 0.*A must be a 2-D floating-point tensor"):
        aggregate("RB-LoRA", [with_factors(pair[0], factors={Q: ([[1.0]], pair[0].factors[Q][1])})])
    with pytest.raises(ValueError, match=r"client 0.*must be a pair \(A, B\)"):
        aggregate("RB-LoRA", [with_factors(pair[0], factors={Q: pair[0].factors[Q][0]})])
    with pytest.raises(ValueError, match="client 1: expected a ClientUpdate"):
        aggregate("RB-LoRA", [pair[0], {"num_examples": 3}])


@pytest.mark.parametrize("method", ["RB-LoRA", "Uniform HETLoRA"])
def test_for_client_arguments(pair, method):
    g = aggregate(method, pair)
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        g.for_client(0, 16.0)
    with pytest.raises(ValueError, match=r"rank 17 exceeds min\(d_out, d_in\) = 16.*v_proj"):
        g.for_client(17, 16.0)
    with pytest.raises(ValueError, match="lora_alpha must be finite and > 0, got 0"):
        g.for_client(2, 0.0)
    with pytest.raises(ValueError, match="unknown module 'nope'"):
        g.delta("nope")
