"""Aggregation as the replies arrive (rblora.aggregation.streaming): the running sums give the
non-streaming aggregation to float rounding for every method, in any arrival order, whether
the stack stays factored or becomes dense band sums, and their size does not grow with K."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from agg_helpers import make_clients

from rblora.aggregation import available_methods, get_method
from rblora.aggregation.api import average_dense
from rblora.aggregation.streaming import RoundSum
from rblora.aggregation.types import assemble

SMALL = {"m.q": (40, 36), "m.v": (30, 36)}  # S = 2+3+5+8 = 18 < 30: the stack stays factored
TIGHT = {"m.q": (12, 10), "m.v": (9, 10)}  # S = 18 > 9, 10: dense band sums


def _ranks(method, ranks):
    return [ranks[0]] * len(ranks) if get_method(method).homogeneous_ranks else ranks


def _reference(method, clients):
    """The list aggregation by the method's own weights over every client (no running sum)."""
    spec = get_method(method)
    ranks = [u.rank(next(iter(u.factors))) for u in clients]
    gamma = spec.weights(ranks, [u.num_examples for u in clients])
    out = {}
    for m in clients[0].factors:
        pairs = [u.scaled_factors(m, torch.float64) for u in clients]
        # a residual method's whole update (factors and residual) is the weighted stack's
        form = "stack" if spec.residual else spec.form
        bs = [p[1] for p in pairs]
        if "B" in spec.protocol.at(1).local:  # the clients' own B: the server sums none
            bs = [torch.zeros_like(b) for b in bs]
        a, b = assemble(form, [p[0] for p in pairs], bs, gamma)
        out[m] = b @ a
    return out, average_dense(clients)


STREAMED = [m for m in available_methods() if get_method(m).share is not None]
"""The methods with a share (HETLoRA's weights need the whole round: it is aggregated from the
round's list, :class:`rblora.aggregation.api.CollectedRound`)."""


@pytest.mark.parametrize("shapes", [SMALL, TIGHT], ids=["factored", "dense"])
@pytest.mark.parametrize("method", STREAMED)
def test_running_sums_equal_the_list_aggregation_in_any_order(method, shapes):
    ranks = _ranks(method, [2, 3, 5, 8, 3, 2])
    clients = make_clients(ranks, [10, 40, 25, 7, 13, 31], shapes=shapes, seed=4, method=method)
    clients = [
        type(u)(u.num_examples, u.lora_alpha, u.factors, client_id=k,
                dense={"head": torch.full((3,), float(k), dtype=torch.float64)})
        for k, u in enumerate(clients)
    ]  # fmt: skip
    want, want_dense = _reference(method, clients)
    spec = get_method(method)
    for order in range(3):
        shuffled = clients[:]
        random.Random(order).shuffle(shuffled)
        # the population's ranks (13: nobody has it this round)
        population = ranks[:1] if spec.homogeneous_ranks else [2, 3, 5, 8, 13]
        total = RoundSum(spec, None, ranks=population)
        for u in shuffled:
            total.add(u)
        got = total.finish()
        for m, delta in want.items():
            torch.testing.assert_close(got.delta(m), delta, rtol=1e-10, atol=1e-12)
            if shapes is TIGHT and spec.form == "stack" and got.reduction != "truncate":
                assert got.is_dense(m)  # wider than the matrix: held as band sums
        torch.testing.assert_close(got.dense["head"], want_dense["head"], rtol=1e-12, atol=0)


def test_rb_lora_dense_bands_follow_the_ranks_and_memory_stays_bounded():
    """RB-LoRA's denominators change where a rank ends: one dense sum per distinct population
    rank, however many clients are folded in; FlexLoRA's do not: one dense sum."""
    ranks = [2, 4, 8]
    for method, bands in (("RB-LoRA", 3), ("FlexLoRA", 1)):
        total = RoundSum(get_method(method), None, ranks=ranks)
        for k in range(60):
            (u,) = make_clients([ranks[k % 3]], [5 + k], shapes=TIGHT, seed=k)
            total.add(dataclasses.replace(u, client_id=k))
        for m in TIGHT:
            held = total._modules[m]
            assert held.dense is not None and len(held.dense) == bands
            assert held.a_rows == [] and held.b_cols == []  # no per-client stack kept


def test_a_round_sum_refuses_what_does_not_fit():
    total = RoundSum(get_method("RB-LoRA"), None, ranks=[2, 4])
    (u,) = make_clients([8], [5], shapes=SMALL)
    with pytest.raises(ValueError, match=r"rank 8, but the round's clients have ranks \[2, 4\]"):
        total.add(u)
    (u,) = make_clients([2], [5], shapes=SMALL)
    total.add(u)
    (v,) = make_clients([2], [5], shapes=TIGHT)
    with pytest.raises(ValueError, match="differs from client 0's"):
        total.add(dataclasses.replace(v, client_id="other"))
    with pytest.raises(ValueError, match="client c0 sent twice"):
        total.add(u)
    with pytest.raises(ValueError, match="FedIT averages A and B"):
        RoundSum(get_method("FedIT"), None, ranks=[2, 4])
    with pytest.raises(ValueError, match="no client updates to aggregate"):
        RoundSum(get_method("FLoRA"), None, ranks=[2]).finish()


@pytest.mark.parametrize("method", STREAMED)
def test_each_share_gives_the_methods_weights(method):
    spec = get_method(method)
    ranks = _ranks(method, [1, 3, 3, 6])
    sizes = [4, 9, 1, 30]
    pairs = [spec.share(r, n, max(ranks)) for r, n in zip(ranks, sizes, strict=True)]
    gamma = torch.stack([p[0] for p in pairs]) / torch.stack([p[1] for p in pairs]).sum(0)
    want = spec.weights(ranks, sizes)
    for k, r in enumerate(ranks):  # entries beyond a client's rank weigh nothing
        torch.testing.assert_close(gamma[k, :r], want[k, :r], rtol=1e-15, atol=0)
