"""One hand-computed two-client example per method (numbers worked out on paper).

Client 1: rank 1, lora_alpha 2 (s = 2), n = 1:  A1 = [[1, 2]],  B1 = [[1], [0], [2]]
    Bh1 = s B1 = [[2], [0], [4]],  dW1 = [[2, 4], [0, 0], [4, 8]]
Client 2: rank 2, lora_alpha 2 (s = 1), n = 3:  A2 = I_2,  B2 = [[1, 2], [3, 4], [5, 6]]
    dW2 = B2 = [[1, 2], [3, 4], [5, 6]]
Data weights p = (1/4, 3/4). d_out = 3, d_in = 2.
"""

from __future__ import annotations

import pytest
import torch

from rblora.aggregation import ClientUpdate, aggregate
from rblora.aggregation.rb_lora import rank_balanced_weights

M = "layer.q"


def two_clients():
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [2.0]])
    a2, b2 = torch.eye(2), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    return [
        ClientUpdate(num_examples=1, lora_alpha=2.0, factors={M: (a1, b1)}),
        ClientUpdate(num_examples=3, lora_alpha=2.0, factors={M: (a2, b2)}),
    ]


def t(rows):
    return torch.tensor(rows)


# Global updates, by hand:
# Uniform HETLoRA: Bbar = ([[2,0],[0,0],[4,0]] + B2)/2 = [[1.5,1],[1.5,2],[4.5,3]],
#   Abar = ([[1,2],[0,0]] + I)/2 = [[1,1],[0,.5]]  ->  Bbar Abar
# Weighted HETLoRA: Bbar = [[1.25,1.5],[2.25,3],[4.75,4.5]], Abar = [[1,.5],[0,.75]]
# FLoRA: dW1/4 + 3 dW2/4
# RB-LoRA: gamma_1 = (1/4, 3/4), gamma_2 = (-, 1):
#   1/4 dW1 + 3/4 [1,3,5]^T [1,0] + [2,4,6]^T [0,1]
# RB-LoRA (factor): B_g = [[1.25,2],[2.25,4],[4.75,6]], A_g = [[1,.5],[0,1]]  ->  B_g A_g
# FlexLoRA: dW1/4 + 3 dW2/4, as FLoRA (it redistributes by SVD instead of merging)
EXPECTED = {
    "FlexLoRA": [[1.25, 2.5], [2.25, 3.0], [4.75, 6.5]],
    "Uniform HETLoRA": [[1.5, 2.0], [1.5, 2.5], [4.5, 6.0]],
    "Weighted HETLoRA": [[1.25, 1.75], [2.25, 3.375], [4.75, 5.75]],
    "FLoRA": [[1.25, 2.5], [2.25, 3.0], [4.75, 6.5]],
    "RB-LoRA": [[1.25, 3.0], [2.25, 4.0], [4.75, 8.0]],
    "RB-LoRA (factor)": [[1.25, 2.625], [2.25, 5.125], [4.75, 8.375]],
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_two_client_global_update(method):
    g = aggregate(method, two_clients())
    torch.testing.assert_close(g.delta(M), t(EXPECTED[method]))


def test_rank_balanced_weights_by_hand():
    torch.testing.assert_close(
        rank_balanced_weights([1, 2], [1, 3]), t([[0.25, 0.0], [0.75, 1.0]]).double()
    )
    # ranks 1, 2, 3 with 10, 20, 70 examples: j=0 all (100), j=1 clients 2,3 (90), j=2 client 3
    torch.testing.assert_close(
        rank_balanced_weights([1, 2, 3], [10, 20, 70]),
        t([[0.1, 0.0, 0.0], [0.2, 2 / 9, 0.0], [0.7, 7 / 9, 1.0]]).double(),
    )


def test_uniform_hetlora_truncates_by_hand():
    # rank 1, lora_alpha 2 (s_r = 2): A = Abar[:1], B = Bbar[:, :1] / 2
    (a, b) = aggregate("Uniform HETLoRA", two_clients()).for_client(1, 2.0)[M]
    torch.testing.assert_close(a, t([[1.0, 1.0]]))
    torch.testing.assert_close(b, t([[0.75], [0.75], [2.25]]))


def test_weighted_hetlora_truncates_by_hand():
    # rank 2, lora_alpha 8 (s_r = 4): A = Abar, B = Bbar / 4
    (a, b) = aggregate("Weighted HETLoRA", two_clients()).for_client(2, 8.0)[M]
    torch.testing.assert_close(a, t([[1.0, 0.5], [0.0, 0.75]]))
    torch.testing.assert_close(b, t([[0.3125, 0.375], [0.5625, 0.75], [1.1875, 1.125]]))


def test_flora_merges_and_exports_its_stack():
    g = aggregate("FLoRA", two_clients())
    assert g.merges_into_base and g.for_client(2, 2.0) == {}
    # stack: [Bh1 Bh2] @ [p1 A1; p2 A2]; 3 components on a 3 x 2 matrix: wider than the matrix,
    # so the running sum holds it dense, B @ A exactly
    stack_a = t([[0.25, 0.5], [0.75, 0.0], [0.0, 0.75]])
    stack_b = t([[2.0, 1.0, 2.0], [0.0, 3.0, 4.0], [4.0, 5.0, 6.0]])
    assert g.is_dense(M)
    torch.testing.assert_close(g.delta(M), stack_b @ stack_a)
    a, b = g.factors(M)  # an exact factored form: (I, dW) with d_in = 2 <= d_out = 3
    torch.testing.assert_close(a, torch.eye(2)) and torch.testing.assert_close(b @ a, g.delta(M))
    wide = aggregate("FLoRA", two_clients(), reduction="truncate")  # truncate keeps the stack
    torch.testing.assert_close(wide.factors(M)[0], stack_a)
    torch.testing.assert_close(wide.factors(M)[1], stack_b)


@pytest.mark.parametrize("method", ["RB-LoRA", "RB-LoRA (factor)"])
def test_svd_methods_full_rank_redistribution_is_exact(method):
    # rank 2 = min(d_out, d_in): the projection keeps everything; lora_alpha 4 (s_r = 2)
    (a, b) = aggregate(method, two_clients()).for_client(2, 4.0)[M]
    torch.testing.assert_close(2.0 * b @ a, t(EXPECTED[method]))
    torch.testing.assert_close(a @ a.T, torch.eye(2))  # A = V^T has orthonormal rows


def test_rb_lora_rank_one_is_the_top_singular_pair():
    # dW = [[1.25,3],[2.25,4],[4.75,8]]; rank-1 projection = sigma_1 u_1 v_1^T, compared
    # with an independent float64 SVD; signs: largest |entry| of the B column is positive
    dw = t(EXPECTED["RB-LoRA"]).double()
    u, s, vh = torch.linalg.svd(dw)
    sign = torch.sign(u[u[:, 0].abs().argmax(), 0])
    (a, b) = aggregate("RB-LoRA", two_clients()).for_client(1, 1.0)[M]
    torch.testing.assert_close(a.double(), sign * vh[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.double(), sign * s[0] * u[:, :1], rtol=1e-5, atol=1e-5)


def test_official_code_bug_is_not_copied():
    """Ranks 4 and 64 with the same lora_alpha: scales differ 16x; folding them in matters."""
    gen = torch.Generator().manual_seed(3)
    d_out, d_in, alpha = 96, 80, 16.0
    ranks, sizes = [4, 64], [300, 100]
    facs = [
        (torch.randn(r, d_in, generator=gen, dtype=torch.float64),
         torch.randn(d_out, r, generator=gen, dtype=torch.float64))
        for r in ranks
    ]  # fmt: skip
    clients = [
        ClientUpdate(num_examples=n, lora_alpha=alpha, factors={M: f})
        for n, f in zip(sizes, facs, strict=True)
    ]
    # RB-LoRA by its definition, component by component: gamma_j(k) = alpha_k * beta_j
    total = sum(sizes)
    want = torch.zeros(d_out, d_in, dtype=torch.float64)
    for (a, b), r, n in zip(facs, ranks, sizes, strict=True):
        for j in range(r):
            beta_j = total / sum(nn for rr, nn in zip(ranks, sizes, strict=True) if rr > j)
            want += (n / total) * beta_j * (alpha / r) * torch.outer(b[:, j], a[j])
    got = aggregate("RB-LoRA", clients).delta(M)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the official code's raw-factor aggregation (scale applied after averaging) is far off
    raw_clients = [
        ClientUpdate(num_examples=n, lora_alpha=float(r), factors={M: f})  # scale 1
        for n, r, f in zip(sizes, ranks, facs, strict=True)
    ]
    raw = aggregate("RB-LoRA", raw_clients).delta(M) * (alpha / 64)
    assert (raw - want).norm() > 0.5 * want.norm()
    # FLoRA: sum p_k s_k B_k A_k
    flora = sum(
        (n / total) * (alpha / r) * b @ a for (a, b), r, n in zip(facs, ranks, sizes, strict=True)
    )
    torch.testing.assert_close(aggregate("FLoRA", clients).delta(M), flora)
    # sending back: the receiver's own scale is divided out (rank 4 client, s = 4)
    (a4, b4) = aggregate("RB-LoRA", clients).for_client(4, alpha)[M]
    u, s, vh = torch.linalg.svd(want)
    torch.testing.assert_close((alpha / 4) * b4 @ a4, (u[:, :4] * s[:4]) @ vh[:4])


def test_flexlora_sends_each_client_the_truncated_svd():
    # rank 1 of the hand-computed dW above, against torch's dense SVD of that matrix
    dw = t(EXPECTED["FlexLoRA"]).double()
    u, sigma, vh = torch.linalg.svd(dw)
    best = sigma[0] * torch.outer(u[:, 0], vh[0])
    (a, b) = aggregate("FlexLoRA", two_clients()).for_client(1, 2.0)[M]  # s_r = 2
    torch.testing.assert_close((2.0 * b @ a).double(), best, rtol=1e-5, atol=1e-5)


def test_fedit_averages_factors_by_hand():
    """Client 1: rank 2, alpha 4 (s = 2), n = 1: A1 = I, B1 = [[1,0],[0,1],[1,1]] -> Bh1 = 2 B1.
    Client 2: rank 2, alpha 2 (s = 1), n = 3: A2 = [[1,1],[0,1]], B2 = [[1,2],[3,4],[5,6]].
    Bbar = Bh1/4 + 3 B2/4 = [[1.25,1.5],[2.25,3.5],[4.25,5]]; Abar = I/4 + 3 A2/4 = [[1,.75],[0,1]]
    dW = Bbar Abar = [[1.25,2.4375],[2.25,5.1875],[4.25,8.1875]] (not the mean of the dW_k)."""
    clients = [
        ClientUpdate(1, 4.0, {M: (torch.eye(2), t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))}),
        ClientUpdate(
            3, 2.0, {M: (t([[1.0, 1.0], [0.0, 1.0]]), t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))}
        ),
    ]
    g = aggregate("FedIT", clients)
    torch.testing.assert_close(g.delta(M), t([[1.25, 2.4375], [2.25, 5.1875], [4.25, 8.1875]]))
    (a, b) = g.for_client(2, 2.0)[M]  # truncate at the common rank, s_r = 1: the averages
    torch.testing.assert_close(a, t([[1.0, 0.75], [0.0, 1.0]]))
    torch.testing.assert_close(b, t([[1.25, 1.5], [2.25, 3.5], [4.25, 5.0]]))


def ffa_clients():
    """FFA-LoRA's clients share one frozen A, ``[[1, 2], [0, 1]]``; client 1 holds its first
    row. Client 1: rank 1, alpha 2 (s = 2), n = 1, B1 = [[1], [0], [2]] -> Bh1 = [[2], [0], [4]].
    Client 2: rank 2, alpha 2 (s = 1), n = 3, B2 = [[1, 2], [3, 4], [5, 6]]."""
    shared = t([[1.0, 2.0], [0.0, 1.0]])
    return [
        ClientUpdate(1, 2.0, {M: (shared[:1].clone(), t([[1.0], [0.0], [2.0]]))}),
        ClientUpdate(3, 2.0, {M: (shared.clone(), t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))}),
    ]


def test_ffa_lora_averages_b_per_component_over_its_holders_by_hand():
    """Column 0 is held by both: 1/4 [2, 0, 4] + 3/4 [1, 3, 5] = [1.25, 2.25, 4.75]; column 1 by
    client 2 alone: [2, 4, 6]. A is the shared [[1, 2], [0, 1]], never averaged:
    dW = [[1.25, 2], [2.25, 4], [4.75, 6]] @ [[1, 2], [0, 1]] = [[1.25, 4.5], [2.25, 8.5],
    [4.75, 15.5]]. A client of rank 1 (s = 2) gets A = [[1, 2]], B = [1.25, 2.25, 4.75] / 2."""
    g = aggregate("FFA-LoRA", ffa_clients())
    a_g, b_g = g.factors(M)
    torch.testing.assert_close(a_g, t([[1.0, 2.0], [0.0, 1.0]]), rtol=0, atol=0)
    torch.testing.assert_close(b_g, t([[1.25, 2.0], [2.25, 4.0], [4.75, 6.0]]))
    torch.testing.assert_close(g.delta(M), t([[1.25, 4.5], [2.25, 8.5], [4.75, 15.5]]))
    (a, b) = g.for_client(1, 2.0)[M]
    torch.testing.assert_close(a, t([[1.0, 2.0]]), rtol=0, atol=0)  # the frozen row, bitwise
    torch.testing.assert_close(b, t([[0.625], [1.125], [2.375]]))


def test_ffa_lora_refuses_clients_without_a_shared_a_and_any_other_redistribution():
    first, second = ffa_clients()
    other = ClientUpdate(3, 2.0, {M: (t([[1.0, 2.5], [0.0, 1.0]]), second.factors[M][1])})
    with pytest.raises(ValueError, match=r"^client 1, module .layer.q.: its frozen A is not"):
        aggregate("FFA-LoRA", [first, other])
    for reduction in ("svd", "merge"):
        with pytest.raises(ValueError, match="its A stays frozen at the shared initialisation"):
            aggregate("ffa_lora", ffa_clients(), reduction=reduction)


def test_rolora_round_1_holds_a_and_averages_b_as_ffa_lora_does_by_hand():
    """An odd RoLoRA round holds A (round 1: the shared initialisation, here the clients' own
    common prefix) and averages B per component over its holders: FFA-LoRA's numbers."""
    g = aggregate("RoLoRA", ffa_clients())
    a_g, b_g = g.factors(M)
    torch.testing.assert_close(a_g, t([[1.0, 2.0], [0.0, 1.0]]), rtol=0, atol=0)
    torch.testing.assert_close(b_g, t([[1.25, 2.0], [2.25, 4.0], [4.75, 6.0]]))
    assert aggregate("RoLoRA", ffa_clients(), round_=3).factors(M)[1].equal(b_g)


def rolora_even_clients(b1=None):
    """An even RoLoRA round: the clients hold the global Bh = [[1, 2], [3, 4], [5, 6]] (client
    1, rank 1, s = 2: B1 = Bh[:, :1] / 2 = [[.5], [1.5], [2.5]]; client 2, rank 2, s = 1:
    B2 = Bh) and trained A1 = [[1, 0]] (n = 1), A2 = [[3, 4], [1, 2]] (n = 3)."""
    b1 = t([[0.5], [1.5], [2.5]]) if b1 is None else b1
    return [
        ClientUpdate(1, 2.0, {M: (t([[1.0, 0.0]]), b1)}),
        ClientUpdate(3, 2.0, {M: (t([[3.0, 4.0], [1.0, 2.0]]), t([[1.0, 2.0], [3.0, 4.0],
                                                                  [5.0, 6.0]]))}),
    ]  # fmt: skip


def test_rolora_round_2_holds_b_and_averages_a_per_component_by_hand():
    """Row 0 of A is held by both: 1/4 [1, 0] + 3/4 [3, 4] = [2.5, 3]; row 1 by client 2
    alone: [1, 2]. Bh is held: dW = [[1, 2], [3, 4], [5, 6]] @ [[2.5, 3], [1, 2]] =
    [[4.5, 7], [11.5, 17], [18.5, 27]]. A client of rank 1 (s = 2) gets A = [[2.5, 3]] and
    B = [[1], [3], [5]] / 2."""
    g = aggregate("RoLoRA", rolora_even_clients(), round_=2)
    a_g, b_g = g.factors(M)
    torch.testing.assert_close(a_g, t([[2.5, 3.0], [1.0, 2.0]]))
    torch.testing.assert_close(b_g, t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), rtol=0, atol=0)
    torch.testing.assert_close(g.delta(M), t([[4.5, 7.0], [11.5, 17.0], [18.5, 27.0]]))
    a, b = g.for_client(1, 2.0)[M]
    torch.testing.assert_close(a, t([[2.5, 3.0]]))
    torch.testing.assert_close(b, t([[0.5], [1.5], [2.5]]))


def test_rolora_holds_the_servers_b_never_a_clients_copy():
    """With the server's global factors given (its start basis), a client's held B is not
    read: a forged one changes nothing; without them, a client whose B is not the shared
    prefix is refused, named."""
    from rblora.aggregation.starts import StartBasis

    basis = StartBasis(2, {M: (torch.eye(2), t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))},
                       torch.float32)  # fmt: skip
    forged = rolora_even_clients(b1=t([[9.0], [9.0], [9.0]]))
    g = aggregate("RoLoRA", forged, round_=2, held=basis)
    torch.testing.assert_close(g.delta(M), t([[4.5, 7.0], [11.5, 17.0], [18.5, 27.0]]))
    with pytest.raises(ValueError, match=r"^client 1, module .layer.q.: its held B is not"):
        aggregate("RoLoRA", forged, round_=2)
    for reduction in ("svd", "merge"):
        with pytest.raises(ValueError, match="its rounds hold one factor at the last global"):
            aggregate("rolora", ffa_clients(), reduction=reduction)


def test_fedex_lora_averages_the_factors_and_folds_the_residual_by_hand():
    """FedEx-LoRA: the factors are Weighted HETLoRA's, Bbar = [[1.25, 1.5], [2.25, 3],
    [4.75, 4.5]], Abar = [[1, .5], [0, .75]], Bbar Abar = [[1.25, 1.75], [2.25, 3.375],
    [4.75, 5.75]]; the exact mean is FLoRA's dW1/4 + 3 dW2/4 = [[1.25, 2.5], [2.25, 3],
    [4.75, 6.5]], so the residual folded into the base is [[0, .75], [0, -.375], [0, .75]]. A
    client of rank 1 (s = 2) starts from A = [[1, .5]], B = [1.25, 2.25, 4.75] / 2."""
    g = aggregate("FedEx-LoRA", two_clients())
    assert g.folds_residual
    a_g, b_g = g.factors(M)
    torch.testing.assert_close(a_g, t([[1.0, 0.5], [0.0, 0.75]]))
    torch.testing.assert_close(b_g, t([[1.25, 1.5], [2.25, 3.0], [4.75, 4.5]]))
    residual = g.residual(M)
    residual = residual if torch.is_tensor(residual) else residual[1] @ residual[0]
    torch.testing.assert_close(residual, t([[0.0, 0.75], [0.0, -0.375], [0.0, 0.75]]))
    torch.testing.assert_close(g.delta(M), t([[1.25, 2.5], [2.25, 3.0], [4.75, 6.5]]))
    a, b = g.for_client(1, 2.0)[M]
    torch.testing.assert_close(a, t([[1.0, 0.5]]))
    torch.testing.assert_close(b, t([[0.625], [1.125], [2.375]]))
    for reduction in ("svd", "merge"):
        with pytest.raises(ValueError, match="its residual is computed against the averaged"):
            aggregate("fedex", two_clients(), reduction=reduction)
    assert not aggregate("Weighted HETLoRA", two_clients()).folds_residual


def threshold_clients():
    """Two clients whose updates are orthogonal: client 1 (rank 1, alpha 1, n = 1) gives
    dW1 = 3 e1 e1^T, client 2 (rank 2, alpha 2, n = 1) dW2 = 2 e2 e2^T + e3 e3^T. FlexLoRA's
    dW = (dW1 + dW2) / 2 = diag(1.5, 1, 0.5): sigma^2 = (2.25, 1, 0.25), total 3.5."""
    e = torch.eye(3)
    return [
        ClientUpdate(1, 1.0, {M: (e[:1].clone(), t([[3.0], [0.0], [0.0]]))}),
        ClientUpdate(1, 2.0, {M: (e[1:].clone(), t([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]))}),
    ]


@pytest.mark.parametrize(
    "energy, kept",
    [(0.6, 1), (0.64, 1), (0.65, 2), (0.9, 2), (0.92, 2), (0.93, 3), (1.0, 3)],
)
def test_threshold_keeps_the_fewest_directions_holding_the_energy_by_hand(energy, kept):
    """FLoRIST: k = the smallest with sigma_1^2 + ... + sigma_k^2 >= energy * 3.5 (2.25 reaches
    0.64 * 3.5 = 2.24 but not 0.65 * 3.5 = 2.275; 3.25 reaches 0.92 * 3.5 = 3.22 but not
    0.93 * 3.5 = 3.255)."""
    g = aggregate("FlexLoRA", threshold_clients(), "threshold", svd_energy=energy)
    assert g.kept_rank(M) == kept
    diag = [1.5, 1.0, 0.5]
    for rank in (1, 2, 3):  # each client gets min(k, r) directions; s_r = 1 with alpha = r
        a, b = g.for_client(rank, float(rank))[M]
        assert a.shape == (rank, 3) and b.shape == (3, rank)
        expected = torch.diag(t([d if i < min(kept, rank) else 0.0 for i, d in enumerate(diag)]))
        torch.testing.assert_close(b @ a, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a @ a.T, torch.eye(rank), rtol=1e-6, atol=1e-6)  # trainable
    torch.testing.assert_close(g.delta(M), torch.diag(t(diag)))  # the global update is exact


@pytest.mark.parametrize("energy, kept", [(0.64, 1), (0.65, 2), (0.93, 3)])
def test_florist_is_flexloras_sum_cut_at_the_energy_rank_by_hand(energy, kept):
    """FLoRIST (the method) is FlexLoRA's dW = diag(1.5, 1, 0.5) with the threshold cut: the
    same kept rank as above, each client of rank r starting from the first min(k, r) of
    diag(1.5, 1, 0.5)'s directions, and the exact sum as the global update."""
    g = aggregate("FLoRIST", threshold_clients(), svd_energy=energy)
    assert (g.method, g.reduction, g.kept_rank(M)) == ("FLoRIST", "threshold", kept)
    diag = [1.5, 1.0, 0.5]
    for rank in (1, 2, 3):
        a, b = g.for_client(rank, float(rank))[M]
        expected = torch.diag(t([d if i < min(kept, rank) else 0.0 for i, d in enumerate(diag)]))
        torch.testing.assert_close(b @ a, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.delta(M), torch.diag(t(diag)))
    for reduction in ("svd", "merge", "truncate"):
        with pytest.raises(ValueError, match="it is FlexLoRA's sum with the threshold cut"):
            aggregate("FLoRIST", threshold_clients(), reduction)


def test_threshold_is_for_the_stack_methods_and_its_energy_is_a_fraction():
    for method in ("RB-LoRA", "FLoRA", "FlexLoRA", "FLoRIST"):
        g = aggregate(method, threshold_clients(), "threshold", svd_energy=0.9)
        assert g.reduction == "threshold" and g.kept_rank(M) >= 1
    for method in ("Uniform HETLoRA", "Weighted HETLoRA", "RB-LoRA (factor)", "FFA-LoRA"):
        with pytest.raises(ValueError, match=r"threshold, FLoRIST's, cuts the SVD of the stack"):
            aggregate(method, two_clients(), "threshold")
    for energy in (0.0, -0.5, 1.01, float("nan"), True):
        with pytest.raises(ValueError, match=rf"^svd_energy {energy!r} must be a fraction in"):
            aggregate("FlexLoRA", threshold_clients(), "threshold", svd_energy=energy)


def fedsa_clients(b_scale: float = 1.0):
    """FedSA-LoRA's clients send A; their B stay home (whatever they hold, here multiples of
    ones). Client 1: rank 1, n = 1, A1 = [[1, 0]]; client 2: rank 2, n = 3,
    A2 = [[3, 4], [1, 2]]; client 3: rank 2, n = 4, A3 = [[0, 2], [5, 0]]."""
    ones = torch.ones
    return [
        ClientUpdate(1, 2.0, {M: (t([[1.0, 0.0]]), b_scale * ones(3, 1))}),
        ClientUpdate(3, 2.0, {M: (t([[3.0, 4.0], [1.0, 2.0]]), b_scale * ones(3, 2))}),
        ClientUpdate(4, 2.0, {M: (t([[0.0, 2.0], [5.0, 0.0]]), -b_scale * ones(3, 2))}),
    ]


def test_fedsa_lora_averages_a_per_component_over_its_holders_and_never_a_b_by_hand():
    """Row 0 of A, held by all three (N = 8): ([1, 0] + 3 [3, 4] + 4 [0, 2]) / 8 = [1.25, 2.5];
    row 1, held by clients 2 and 3 (7 examples): (3 [1, 2] + 4 [5, 0]) / 7 = [23/7, 6/7]. B is
    the clients' own: the server's is zero, whatever they hold, and so is its update (there is
    no global model). A client of rank 1 starts from A = [[1.25, 2.5]] and a zero B (which it
    replaces by its own)."""
    g = aggregate("FedSA", fedsa_clients())
    a_g, b_g = g.factors(M)
    torch.testing.assert_close(a_g, t([[1.25, 2.5], [23 / 7, 6 / 7]]))
    assert b_g.shape == (3, 2) and not b_g.any() and not g.delta(M).any()
    other = aggregate("FedSALoRA", fedsa_clients(b_scale=-7.0))
    torch.testing.assert_close(other.factors(M)[0], a_g, rtol=0, atol=0)
    a, b = g.for_client(1, 2.0)[M]
    torch.testing.assert_close(a, t([[1.25, 2.5]]))
    assert b.shape == (3, 1) and not b.any()
    for reduction in ("svd", "merge"):
        with pytest.raises(ValueError, match="its clients keep their own B"):
            aggregate("fedsa_lora", fedsa_clients(), reduction=reduction)
