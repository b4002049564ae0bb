"""The client protocol a method declares (which factors a client trains, sends, keeps) and how
the round core applies it (rblora.protocol.factors): the frozen initialisation, a client's
start, what travels and what the server aggregates."""

from __future__ import annotations

import math

import pytest
import torch

from rblora.aggregation import ClientUpdate, available_methods, get_method
from rblora.aggregation.frozen import FrozenInit
from rblora.aggregation.types import ClientProtocol, ProtocolCycle
from rblora.protocol.codec import decode_start, decode_update, encode_start, encode_update
from rblora.protocol.factors import FactorPlan
from rblora.protocol.types import ClientSpec, ClientStart, UpdateLayout

LAYOUT = UpdateLayout({"q": (6, 5), "v": (4, 5)})


def test_every_method_declares_a_protocol_and_only_ffa_lora_rolora_and_fedsa_lora_differ():
    declared = {m: get_method(m).protocol for m in available_methods()}
    default = ClientProtocol()
    assert (default.trains, default.sends, default.keeps) == (("A", "B"), ("A", "B"), ())
    ffa = declared.pop("FFA-LoRA")
    assert (ffa.trains, ffa.sends, ffa.keeps, ffa.frozen) == (("B",), ("B",), ("A",), ("A",))
    assert ffa.receives == ("B",) and ffa.at(2) is ffa
    rolora = declared.pop("RoLoRA")
    odd, even = rolora.at(1), rolora.at(2)
    assert (odd.trains, odd.sends, odd.receives, odd.held) == (("B",), ("B",), ("A", "B"), ("A",))
    assert (even.trains, even.sends, even.receives, even.held) == (
        ("A",), ("A",), ("A", "B"), ("B",),
    )  # fmt: skip
    assert rolora.at(3) == odd and rolora.at(4) == even and not odd.frozen
    fedsa = declared.pop("FedSA-LoRA")  # B trained and kept: never sent, never received
    assert (fedsa.trains, fedsa.sends, fedsa.receives) == (("A", "B"), ("A",), ("A",))
    assert (fedsa.local, fedsa.keeps, fedsa.fixed, fedsa.has_global_model) == (
        ("B",), ("B",), (), False,
    )  # fmt: skip
    assert all(p == default and p.has_global_model for p in declared.values())


@pytest.mark.parametrize(
    "roles, fragment",
    [
        ({"A": "kept"}, "A has role 'kept'"),
        ({"A": "local"}, "only B may be local"),
        ({"B": "frozen"}, "only A may be frozen"),
        ({"A": "held", "B": "held"}, "at least one factor must be trained"),
    ],
)
def test_a_protocol_the_round_core_cannot_run_is_refused(roles, fragment):
    with pytest.raises(ValueError, match=fragment):
        ClientProtocol(**roles)


def test_a_cycle_cannot_hold_b_first_and_its_rounds_start_at_1():
    with pytest.raises(ValueError, match="round 1 cannot hold B"):
        ProtocolCycle((ClientProtocol(B="held"), ClientProtocol(A="held")))
    cycle = ProtocolCycle((ClientProtocol(A="held"), ClientProtocol(B="held")))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            cycle.at(bad)


def test_a_rolora_client_trains_b_from_the_seeded_a_then_a_from_the_servers_b():
    plan = FactorPlan.for_method("RoLoRA", 3)
    spec = ClientSpec(1, 2, 4.0, num_examples=5)
    fresh = plan.client_start(spec, ClientStart(None), LAYOUT.modules)  # round 1: A held
    assert fresh.trains == ("B",)
    for m, (d_out, d_in) in LAYOUT.modules.items():
        assert torch.equal(fresh.factors[m][0], FrozenInit(3).rows(m, 2, d_in))
        assert torch.equal(fresh.factors[m][1], torch.zeros(d_out, 2))
    given = {m: (torch.ones(2, d_in), torch.full((d_out, 2), 0.5)) for m, (d_out, d_in) in
             LAYOUT.modules.items()}  # fmt: skip
    for round_, trains in ((2, ("A",)), (3, ("B",))):  # the server's factors, one trained
        start = plan.at(round_).client_start(spec, ClientStart(given), LAYOUT.modules)
        assert start.trains == trains
        for m in LAYOUT.modules:
            assert all(torch.equal(x, y) for x, y in zip(start.factors[m], given[m], strict=True))


def test_a_rolora_reply_carries_the_trained_factor_and_the_server_holds_its_own_copy():
    plan = FactorPlan.for_method("RoLoRA", 3).at(2)  # an even round: A trained, B held
    spec = ClientSpec(1, 2, 4.0, num_examples=5)
    update = _update(2, a_value=7.0)
    tensors, meta = encode_update(update, plan.sends)
    assert sorted(tensors) == ["update/lora/q/A", "update/lora/v/A"]
    decoded, _ = decode_update(tensors, meta, spec, LAYOUT, plan)
    server_start = {m: (torch.zeros(2, d_in), torch.full((d_out, 2), 3.0)) for m, (d_out, d_in)
                    in LAYOUT.modules.items()}  # fmt: skip
    for m in LAYOUT.modules:
        assert torch.equal(decoded.factors[m][0], update.factors[m][0])
        restored = plan.restore(decoded, server_start).factors[m]
        assert torch.equal(restored[0], update.factors[m][0])  # the trained A, as sent
        assert torch.equal(restored[1], server_start[m][1])  # B: the server's, not the client's
    full, meta = encode_update(update)
    with pytest.raises(ValueError, match="unexpected arrays.*update/lora/q/B"):
        decode_update(full, meta, spec, LAYOUT, plan)
    # down: both factors (the held one changed last round); up: A alone
    start_tensors, _ = encode_start(ClientStart(dict(update.factors)), plan.receives)
    assert sorted(start_tensors) == [f"start/lora/{m}/{f}" for m in "qv" for f in "AB"]
    a_size = sum(d_in * 2 for _, d_in in LAYOUT.modules.values())
    assert sum(t.numel() for t in plan.travels(update.factors)) == a_size
    assert sum(t.numel() for t in plan.travels(update.factors, down=True)) == a_size + 2 * 10


def test_the_frozen_initialisation_is_seeded_and_a_client_of_rank_r_holds_its_first_rows():
    init = FrozenInit(3)
    wide = init.rows("q", 8, 5)
    assert torch.equal(init.rows("q", 3, 5), wide[:3])  # a prefix, whatever the widest rank
    assert torch.equal(FrozenInit(3).rows("q", 8, 5), wide)  # the same bits on every side
    assert not torch.equal(FrozenInit(4).rows("q", 8, 5), wide)  # the run's seed decides
    assert not torch.equal(init.rows("v", 8, 5), wide)  # one matrix per module
    assert wide.dtype == torch.float32 and float(wide.abs().max()) <= 1 / math.sqrt(5)
    assert int(torch.linalg.matrix_rank(wide.double()[:5])) == 5


def test_a_ffa_client_starts_from_the_frozen_a_and_trains_b_only():
    plan = FactorPlan.for_method("FFA-LoRA", 3)
    spec = ClientSpec(1, 2, 4.0, num_examples=5)
    fresh = plan.client_start(spec, ClientStart(None), LAYOUT.modules)
    assert fresh.trains == ("B",)
    for m, (d_out, d_in) in LAYOUT.modules.items():
        a, b = fresh.factors[m]
        assert torch.equal(a, FrozenInit(3).rows(m, 2, d_in))
        assert torch.equal(b, torch.zeros(d_out, 2))
    # the server's start may hold another A (its basis): the client's is the frozen one
    given = {m: (torch.ones(2, d_in), torch.full((d_out, 2), 0.5)) for m, (d_out, d_in) in
             LAYOUT.modules.items()}  # fmt: skip
    start = plan.client_start(spec, ClientStart(given), LAYOUT.modules)
    for m, (_, d_in) in LAYOUT.modules.items():
        assert torch.equal(start.factors[m][0], FrozenInit(3).rows(m, 2, d_in))
        assert torch.equal(start.factors[m][1], given[m][1])


def test_the_default_protocol_leaves_the_start_and_the_update_as_they_are():
    plan = FactorPlan.for_method("RB-LoRA", 3)
    start = ClientStart({"q": (torch.ones(2, 5), torch.ones(6, 2))})
    assert plan.client_start(ClientSpec(0, 2, 4.0), start, LAYOUT.modules) is start
    update = ClientUpdate(5, 4.0, {"q": (torch.ones(2, 5), torch.ones(6, 2))})
    assert plan.restore(update) is update
    assert len(plan.travels(update.factors)) == 2


def _update(rank, a_value=1.0):
    factors = {m: (torch.full((rank, d_in), a_value), torch.randn(d_out, rank))
               for m, (d_out, d_in) in LAYOUT.modules.items()}  # fmt: skip
    return ClientUpdate(5, 4.0, factors, client_id=1)


def test_a_frozen_a_never_travels_and_the_server_uses_its_own():
    plan = FactorPlan.for_method("FFA-LoRA", 3)
    spec = ClientSpec(1, 2, 4.0, num_examples=5)
    update = _update(2, a_value=7.0)  # whatever A the client holds
    tensors, meta = encode_update(update, plan.sends)
    assert sorted(tensors) == ["update/lora/q/B", "update/lora/v/B"]
    decoded, _ = decode_update(tensors, meta, spec, LAYOUT, plan)
    for m, (_, d_in) in LAYOUT.modules.items():
        assert torch.equal(decoded.factors[m][0], FrozenInit(3).rows(m, 2, d_in))
        assert torch.equal(decoded.factors[m][1], update.factors[m][1])
        assert torch.equal(plan.restore(update).factors[m][0], FrozenInit(3).rows(m, 2, d_in))
    # a reply that carries an A anyway is refused, naming it
    full, meta = encode_update(update)
    with pytest.raises(ValueError, match="unexpected arrays.*update/lora/q/A"):
        decode_update(full, meta, spec, LAYOUT, plan)
    # the start a node receives: B alone, A drawn by the node
    start_tensors, start_meta = encode_start(ClientStart(dict(update.factors)), plan.sends)
    assert not any(k.endswith("/A") for k in start_tensors)
    start = decode_start(start_tensors, start_meta, plan.filler(2, LAYOUT.modules))
    assert torch.equal(start.factors["q"][0], FrozenInit(3).rows("q", 2, 5))
    # bytes: B alone
    assert sum(t.numel() for t in plan.travels(update.factors)) == (6 + 4) * 2


def test_a_reply_of_smaller_rank_only_where_the_method_prunes_and_never_larger():
    """The server checks a reply's rank against its own word: HETLoRA's clients may reply at a
    smaller rank (rank self-pruning), every other method's at exactly the client's rank, and no
    reply above it."""
    from rblora.federation.rounds import RunError, client_update
    from rblora.protocol.factors import FactorPlan
    from rblora.protocol.types import ClientResult, ClientSpec

    spec = ClientSpec(0, rank=4, lora_alpha=8.0, num_examples=3)

    def result(rank):
        return ClientResult({"q": (torch.zeros(rank, 5), torch.zeros(6, rank))}, 3)

    hetlora, rb = FactorPlan.for_method("HETLoRA", 0), FactorPlan.for_method("RB-LoRA", 0)
    assert hetlora.prunes and not rb.prunes and hetlora.at(2).prunes
    assert client_update(spec, result(2), hetlora).rank("q") == 2
    assert client_update(spec, result(4), rb).rank("q") == 4
    with pytest.raises(RunError, match=r"client 0 replied at rank 2; the server expects 4 "):
        client_update(spec, result(2), rb)
    with pytest.raises(RunError, match=r"rank 5; the server expects at most 4 \(its rank"):
        client_update(spec, result(5), hetlora)
