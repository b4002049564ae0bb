"""Every client's start is cut from one start basis (svd and truncate redistribution)."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import best_rank, make_clients

from rblora.aggregation import aggregate, lora_scale
from rblora.aggregation.starts import StartBasis


@pytest.mark.parametrize(
    ("method", "reduction"),
    [("RB-LoRA", "svd"), ("Weighted HETLoRA", "truncate"), ("Weighted HETLoRA", "svd"),
     ("FLoRA", "truncate"), ("FlexLoRA", "svd")],
)  # fmt: skip
def test_each_start_is_a_prefix_of_the_basis_divided_by_its_own_scale(method, reduction):
    # HETLoRA's global factors are 4 wide: a basis of width 7 adds 3 orthonormal rows
    g = aggregate(method, make_clients([1, 2, 4], [10, 30, 60]), reduction=reduction)
    basis = g.start_basis(7)
    for rank, alpha, rs in [(1, 16.0, False), (3, 4.0, True), (7, 32.0, False)]:
        start = basis.for_client(rank, alpha, use_rslora=rs)
        scale = lora_scale(alpha, rank, rs)
        for m, (a_w, b_w) in basis.factors.items():
            a, b = start[m]
            assert a.shape == (rank, a_w.shape[1]) and b.shape == (b_w.shape[0], rank)
            assert torch.equal(a, a_w[:rank])
            p = min(rank, b_w.shape[1])
            assert torch.equal(b[:, :p], b_w[:, :p] / scale)
            assert torch.count_nonzero(b[:, p:]) == 0
            if reduction == "svd":  # the best rank-r approximation, while components last
                want = best_rank(g.delta(m), min(rank, g.rank(m)))
                torch.testing.assert_close(scale * b @ a, want, rtol=1e-10, atol=1e-10)
    for a_w, b_w in basis.factors.values():
        hetlora = method == "Weighted HETLoRA"
        assert a_w.shape[0] == 7 and b_w.shape[1] == (4 if hetlora else 7)
        if hetlora:  # the rows beyond the update's 4 components are orthonormal to all others
            extra = a_w[4:]
            torch.testing.assert_close(extra @ a_w.T, torch.eye(7, dtype=a_w.dtype)[4:])


def test_for_client_is_the_start_cut_from_a_basis_of_its_own_rank():
    g = aggregate("RB-LoRA", make_clients([1, 2, 4], [10, 30, 60]))
    wide = g.start_basis(6)
    for rank in (1, 4, 6):
        direct, cut = g.for_client(rank, 16.0), wide.for_client(rank, 16.0)
        for m in direct:  # one SVD, computed once: the prefix is bitwise the same
            assert torch.equal(direct[m][0], cut[m][0]) and torch.equal(direct[m][1], cut[m][1])
    assert aggregate("FLoRA", make_clients([1, 2], [1, 1])).start_basis(2) is None  # merge


def test_basis_refuses_ranks_it_cannot_serve_and_bad_shapes():
    g = aggregate("Uniform HETLoRA", make_clients([1, 2], [10, 30]))
    basis = g.start_basis(3)
    with pytest.raises(ValueError, match=r"rank 4 is outside 1..3"):
        basis.for_client(4, 16.0)
    with pytest.raises(ValueError, match="lora_alpha must be finite and > 0"):
        basis.for_client(2, float("nan"))
    a, b = torch.zeros(3, 5), torch.zeros(6, 4)
    with pytest.raises(ValueError, match=r"module 'm' has A \(3, 5\), B \(6, 4\); width 3"):
        StartBasis(3, {"m": (a, b)}, torch.float32)
