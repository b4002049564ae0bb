"""SVD redistribution = best rank-r approximation; factored and dense paths; caching; signs."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import best_rank, make_clients

from rblora.aggregation import ClientUpdate, aggregate
from rblora.aggregation.linalg import FactoredSVD, orthonormal_complement_rows


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
@pytest.mark.parametrize("method", ["RB-LoRA", "RB-LoRA (factor)", "FLoRA", "Weighted HETLoRA"])
def test_svd_redistribution_is_the_best_rank_r_approximation(method, dtype, tol):
    shapes = {"wide": (40, 64), "tall": (64, 40)}
    clients = make_clients([2, 3, 8, 8], [5, 9, 20, 20], shapes=shapes, dtype=dtype)
    g = aggregate(method, clients, reduction="svd")
    for r in (1, 2, 5, 8):
        sent = g.for_client(r, lora_alpha=32.0)
        for m, (a, b) in sent.items():
            assert a.dtype == b.dtype == dtype
            got = (32.0 / r) * b @ a
            assert rel_err(got, best_rank(g.delta(m), r)) < tol
            torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=dtype), rtol=0, atol=10 * tol)


def test_dense_path_when_the_stack_is_wide():
    # S = 4 + 4 + 4 = 12 >= min(10, 8): the dense SVD is used; same contract
    shapes = {"m": (10, 8)}
    clients = make_clients([4, 4, 4], [1, 2, 3], shapes=shapes)
    g = aggregate("RB-LoRA", clients)
    for r in (1, 3, 8):
        (a, b) = g.for_client(r, 16.0)["m"]
        assert a.shape == (r, 8) and b.shape == (10, r)
        assert rel_err((16.0 / r) * b @ a, best_rank(g.delta("m"), r)) < 1e-10


def test_factored_svd_matches_dense_singular_values_and_fixes_signs():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 50, generator=gen, dtype=torch.float64)
    b = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    svd = FactoredSVD(a, b)
    torch.testing.assert_close(svd.sigma, torch.linalg.svdvals(b @ a)[:6])
    a_r, b_r = svd.truncated(4)
    peak = b_r.abs().argmax(dim=0)
    assert (b_r[peak, torch.arange(4)] > 0).all()  # largest |entry| of each column is positive
    a_r2, b_r2 = FactoredSVD(-a, -b).truncated(4)  # same product, flipped factors
    torch.testing.assert_close(a_r2, a_r)
    torch.testing.assert_close(b_r2, b_r)
    with pytest.raises(ValueError, match="rank 7 is outside 1..6"):
        svd.truncated(7)


def test_one_decomposition_per_module_shared_by_all_clients(monkeypatch):
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    clients = make_clients([1, 2, 4], [10, 30, 60])
    g = aggregate("RB-LoRA", clients)
    assert calls == []  # lazy: nothing until a client asks
    first = {r: g.for_client(r, 16.0) for r in (4, 1, 2, 4, 7)}
    assert calls == [(7, 7), (7, 7)]  # one small k x k core per module, never d_out x d_in
    again = g.for_client(2, 16.0)
    for m in again:
        torch.testing.assert_close(again[m][0], first[2][m][0], rtol=0, atol=0)


def test_ranks_beyond_the_stack_add_trainable_orthonormal_rows():
    clients = make_clients([1, 2], [10, 30])  # S = 3 on each module
    for method in ("RB-LoRA", "Uniform HETLoRA"):
        g = aggregate(method, clients)
        for m, (a, b) in g.for_client(9, 16.0).items():
            k = g.rank(m)
            torch.testing.assert_close(b[:, k:], torch.zeros_like(b[:, k:]))
            extra = a[k:]
            torch.testing.assert_close(extra @ extra.T, torch.eye(9 - k, dtype=a.dtype))
            torch.testing.assert_close(extra @ a[:k].T, torch.zeros(9 - k, k, dtype=a.dtype))
            torch.testing.assert_close((16.0 / 9) * b @ a, g.delta(m))


def test_orthonormal_complement_of_rank_deficient_rows():
    rows = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    comp = orthonormal_complement_rows(rows, 2)
    torch.testing.assert_close(comp @ comp.T, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(comp @ rows.T, torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("method", ["RB-LoRA", "Uniform HETLoRA", "FLoRA"])
def test_untrained_clients_with_zero_b_give_a_fresh_lora(method):
    # PEFT initialises B = 0: a client that did not train sends a zero update
    clients = make_clients([2, 4], [10, 30])
    zero = []
    for u in clients:
        factors = {m: (a, torch.zeros_like(b)) for m, (a, b) in u.factors.items()}
        zero.append(ClientUpdate(u.num_examples, u.lora_alpha, factors))
    g = aggregate(method, zero, reduction="svd" if method == "FLoRA" else None)
    for m, (a, b) in g.for_client(3, 16.0).items():
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(g.delta(m)) == 0
        assert torch.linalg.matrix_rank(a) == 3
