"""Invariants every registered method (and every reduction it accepts) must satisfy."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import SHAPES, client_delta, fit, make_clients

from rblora.aggregation import (
    ClientUpdate,
    aggregate,
    available_methods,
    get_method,
    lora_scale,
    supported_reductions,
)

COMBOS = [(m, r) for m in available_methods() for r in supported_reductions(m)]
MODULES = sorted(SHAPES)


def shared_only(method: str) -> bool:
    """A method whose clients keep B (FedSA-LoRA): the server's update is the shared A with a
    zero B, so the invariants hold for A, and the update itself is zero (no global model)."""
    return not get_method(method).protocol.has_global_model


def peft_delta(factors, rank, alpha, use_rslora=False):
    a, b = factors
    return lora_scale(alpha, rank, use_rslora) * (b @ a)


def test_all_methods_registered_with_defaults():
    assert available_methods() == [
        "RB-LoRA",
        "RB-LoRA (factor)",
        "Uniform HETLoRA",
        "Weighted HETLoRA",
        "HETLoRA",
        "FLoRA",
        "FlexLoRA",
        "FedIT",
        "FFA-LoRA",
        "RoLoRA",
        "FedEx-LoRA",
        "FedSA-LoRA",
        "FLoRIST",
    ]
    defaults = {m: supported_reductions(m)[0] for m in available_methods()}
    assert defaults == {
        "RB-LoRA": "svd",
        "RB-LoRA (factor)": "svd",
        "Uniform HETLoRA": "truncate",
        "Weighted HETLoRA": "truncate",
        "HETLoRA": "truncate",
        "FLoRA": "merge",
        "FlexLoRA": "svd",
        "FedIT": "truncate",
        "FFA-LoRA": "truncate",
        "RoLoRA": "truncate",
        "FedEx-LoRA": "truncate",
        "FedSA-LoRA": "truncate",
        "FLoRIST": "threshold",
    }


@pytest.mark.parametrize("alias", ["rb_lora", "RBLoRA", "rb-lora", "rblora"])
def test_aliases(alias):
    assert get_method(alias).name == "RB-LoRA"
    assert get_method("uniform_hetlora").name == "Uniform HETLoRA"
    assert get_method("flora").name == "FLoRA"
    assert get_method("rb_lora_factor").name == "RB-LoRA (factor)"
    assert get_method("ro_lora").name == get_method("Ro-LoRA").name == "RoLoRA"
    assert get_method("fedex").name == get_method("fedex_lora").name == "FedEx-LoRA"


@pytest.mark.parametrize(("method", "reduction"), COMBOS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_single_client_returns_its_own_update(method, reduction, use_rslora):
    (u,) = make_clients([3], [7], alphas=[12.0], use_rslora=use_rslora)
    g = aggregate(method, [u], reduction=reduction)
    if shared_only(method):  # its own A back, B zero: the server never has one
        for m in MODULES:
            a, b = g.factors(m)
            torch.testing.assert_close(a, u.factors[m][0], rtol=1e-10, atol=1e-12)
            assert not b.any() and not g.delta(m).any()
            sent = g.for_client(rank=3, lora_alpha=12.0, use_rslora=use_rslora)[m]
            torch.testing.assert_close(sent[0], u.factors[m][0], rtol=1e-10, atol=1e-12)
            assert not sent[1].any()
        return
    for m in MODULES:
        torch.testing.assert_close(g.delta(m), client_delta(u, m), rtol=1e-10, atol=1e-12)
    sent = g.for_client(rank=3, lora_alpha=12.0, use_rslora=use_rslora)
    if reduction == "merge":
        assert sent == {}
        return
    for m in MODULES:
        got = peft_delta(sent[m], 3, 12.0, use_rslora)
        torch.testing.assert_close(got, client_delta(u, m), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("method", "reduction"), COMBOS)
def test_client_order_does_not_matter(method, reduction):
    clients = make_clients(
        fit(method, [1, 2, 4]), [10, 30, 60], alphas=[8.0, 16.0, 4.0], method=method
    )
    g1 = aggregate(method, clients, reduction=reduction)
    g2 = aggregate(method, clients[::-1], reduction=reduction)
    for m in MODULES:
        torch.testing.assert_close(g1.delta(m), g2.delta(m), rtol=1e-10, atol=1e-12)
    if reduction == "truncate" and not get_method(method).ordered_components:
        return  # documented: truncating a stack keeps the first clients' components
    for r in (1, 3):
        s1, s2 = g1.for_client(r, 16.0), g2.for_client(r, 16.0)
        assert s1.keys() == s2.keys()
        for m in s1:  # factors themselves agree (deterministic signs), not only products
            torch.testing.assert_close(s1[m][0], s2[m][0], rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(s1[m][1], s2[m][1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", available_methods())
def test_equal_ranks_and_sizes_exact_mean_where_promised(method):
    clients = make_clients([3, 3, 3], [50, 50, 50], method=method)
    g = aggregate(method, clients)
    for m in MODULES:
        mean = sum(client_delta(u, m) for u in clients) / 3
        if get_method(method).exact_mean:
            torch.testing.assert_close(g.delta(m), mean, rtol=1e-10, atol=1e-12)
        else:  # product of mean factors: a different update, as documented
            assert (g.delta(m) - mean).norm() > 1e-3 * mean.norm()


@pytest.mark.parametrize(("method", "reduction"), COMBOS)
@pytest.mark.parametrize("rank", [1, 2, 4, 7, 10, 16])
def test_for_client_gives_exactly_the_asked_rank(method, reduction, rank):
    clients = make_clients(fit(method, [1, 2, 4]), [10, 30, 60], method=method)
    g = aggregate(method, clients, reduction=reduction)
    sent = g.for_client(rank=rank, lora_alpha=16.0)
    if reduction == "merge":
        assert sent == {} and g.merges_into_base
        return
    assert not g.merges_into_base
    assert sorted(sent) == MODULES
    for m, (a, b) in sent.items():
        d_out, d_in = SHAPES[m]
        assert a.shape == (rank, d_in) and b.shape == (d_out, rank)
        assert torch.linalg.matrix_rank(a) == rank  # every component is trainable
        a_g, b_g = g.factors(m)  # what is redistributed: the update, but a residual (FedEx)
        expected = min(rank, torch.linalg.matrix_rank(b_g @ a_g).item())
        assert torch.linalg.matrix_rank(b @ a) == expected
        if rank >= g.rank(m):  # everything fits: the delta is the global update itself
            torch.testing.assert_close(
                peft_delta((a, b), rank, 16.0), b_g @ a_g, rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize(("method", "reduction"), COMBOS)
def test_rslora_scaling(method, reduction):
    rs = make_clients(
        fit(method, [2, 4]), [10, 30], alphas=[8.0, 16.0], use_rslora=True, method=method
    )
    # The same updates as plain-LoRA clients: B * sqrt(r) under alpha/r equals B under alpha/sqrt(r)
    plain = [
        ClientUpdate(
            u.num_examples,
            u.lora_alpha,
            {m: (a, b * a.shape[0] ** 0.5) for m, (a, b) in u.factors.items()},
        )
        for u in rs
    ]
    g_rs = aggregate(method, rs, reduction=reduction)
    g_plain = aggregate(method, plain, reduction=reduction)
    no_rs = aggregate(
        method,
        make_clients(fit(method, [2, 4]), [10, 30], alphas=[8.0, 16.0], method=method),
        reduction,
    )
    for m in MODULES:
        torch.testing.assert_close(g_rs.delta(m), g_plain.delta(m), rtol=1e-10, atol=1e-12)
        if shared_only(method):  # A carries no scale: the same A whatever the scaling
            torch.testing.assert_close(g_rs.factors(m)[0], no_rs.factors(m)[0])
            continue
        assert not torch.allclose(g_rs.delta(m), no_rs.delta(m))
    if reduction == "merge":
        return
    for r in (2, 3):
        s_plain = g_rs.for_client(r, 16.0, use_rslora=False)
        s_rs = g_rs.for_client(r, 16.0, use_rslora=True)
        for m in MODULES:  # the receiver's own scale is divided out: both give the same delta
            torch.testing.assert_close(s_plain[m][0], s_rs[m][0])
            torch.testing.assert_close(
                peft_delta(s_rs[m], r, 16.0, True), peft_delta(s_plain[m], r, 16.0, False)
            )
            ratio = lora_scale(16.0, r, False) / lora_scale(16.0, r, True)
            torch.testing.assert_close(s_rs[m][1], s_plain[m][1] * ratio)


@pytest.mark.parametrize(("method", "reduction"), COMBOS)
def test_global_update_object(method, reduction):
    clients = make_clients(fit(method, [1, 2, 4]), [10, 30, 60], dtype=torch.float32, method=method)
    g = aggregate(method, clients, reduction=reduction)
    assert g.method == method and g.reduction == reduction and g.modules == MODULES
    assert g.merges_into_base == (reduction == "merge")
    for m in MODULES:
        a, b = g.factors(m)
        assert a.dtype == b.dtype == g.delta(m).dtype == torch.float32
        assert a.shape[0] == b.shape[1] == g.rank(m)
        if g.folds_residual:  # FedEx-LoRA: the update is the factors' product and the residual
            r = g.residual(m)
            torch.testing.assert_close(b @ a + (r if torch.is_tensor(r) else r[1] @ r[0]),
                                       g.delta(m))  # fmt: skip
        else:
            torch.testing.assert_close(b @ a, g.delta(m))
        stacked = get_method(method).form == "stack"
        assert g.rank(m) == (7 if stacked else 4)
    if reduction != "merge":
        assert all(t.dtype == torch.float32 for ab in g.for_client(3, 16.0).values() for t in ab)


@pytest.mark.parametrize(("method", "reduction"), COMBOS)
def test_inputs_never_modified_and_outputs_not_shared(method, reduction):
    clients = make_clients(fit(method, [1, 2, 4]), [10, 30, 60], method=method)
    before = [{m: (a.clone(), b.clone()) for m, (a, b) in u.factors.items()} for u in clients]
    g = aggregate(method, clients, reduction=reduction)
    for m in MODULES:
        g.delta(m).mul_(0)
        g.factors(m)[0].mul_(0)
    first = g.for_client(2, 16.0)
    for a, b in first.values():
        a.mul_(0), b.mul_(0)
    again = g.for_client(2, 16.0)
    for m in MODULES:
        assert g.factors(m)[0].abs().sum() > 0
        assert g.delta(m).abs().sum() > 0 or shared_only(method)  # FedSA-LoRA: no update
        if again:
            assert again[m][0].abs().sum() > 0
            assert again[m][1].abs().sum() > 0 or shared_only(method)
    for u, saved in zip(clients, before, strict=True):
        for m, (a, b) in u.factors.items():
            assert torch.equal(a, saved[m][0]) and torch.equal(b, saved[m][1])


@pytest.mark.parametrize("method", available_methods())
def test_live_parameters_are_fine_and_later_changes_do_not_leak(method):
    clients = make_clients(fit(method, [1, 2, 4]), [10, 30, 60], method=method)
    params = [
        ClientUpdate(
            u.num_examples,
            u.lora_alpha,
            {m: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()))
             for m, (a, b) in u.factors.items()},
        )
        for u in clients
    ]  # fmt: skip
    g = aggregate(method, params)
    want = {m: g.delta(m).clone() for m in MODULES}
    with torch.no_grad():  # the clients keep training on the same tensors
        for u in params:
            for a, b in u.factors.values():
                a.add_(1.0), b.mul_(3.0)
    for m in MODULES:
        assert not g.delta(m).requires_grad
        torch.testing.assert_close(g.delta(m), want[m], rtol=0, atol=0)
    for a, b in g.for_client(2, 16.0).values():
        assert not a.requires_grad and not b.requires_grad


def test_homogeneous_methods_refuse_mixed_ranks_naming_them():
    from rblora.aggregation.registry import check_ranks_fit

    with pytest.raises(ValueError, match=r"FedIT averages A and B .* ranks \[2, 4\]"):
        aggregate("FedIT", make_clients([2, 4], [10, 30]))
    with pytest.raises(
        ValueError, match=r"FedIT needs every client at the same rank, got \[2, 4\]"
    ):
        check_ranks_fit("fedavg", [2, 4])
    check_ranks_fit("FedIT", [4, 4])
    check_ranks_fit("FlexLoRA", [2, 4])
