"""The form a global update is handed out in (round folders): orthonormal rows of A at the
numerical rank, the same update, and no block of a client's own factors."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import fit, make_clients

from rblora.aggregation import aggregate, available_methods
from rblora.aggregation.running import orthonormal_form


def _orthonormal_rows(a):
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    torch.testing.assert_close(a.double() @ a.double().T, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", available_methods())
def test_an_exported_global_update_is_no_stack_of_client_blocks(method):
    """Every method's global folder: A with orthonormal rows at the numerical rank (at most
    sum r_k), the same global update; and no block of B is a client's own (scaled) factor, as
    it was when a stack was written as it is (ranks 2, 4, 8: columns 2-6 were 2 B_1)."""
    ranks = fit(method, [2, 4, 8])
    clients = make_clients(ranks, [10, 20, 30], shapes={"m": (24, 20)}, method=method)
    g = aggregate(method, clients)
    a, b = orthonormal_form(g.factors("m"))
    _orthonormal_rows(a)
    assert a.shape[0] <= sum(ranks)
    fa, fb = g.factors("m")  # the factors (FedEx-LoRA: its residual goes into the base)
    torch.testing.assert_close(b @ a, (fb @ fa).float(), rtol=1e-4, atol=1e-5)
    for u in clients:
        own = u.factors["m"][1]
        r = own.shape[1]
        for start in range(b.shape[1] - r + 1):
            block = b[:, start : start + r]
            block = block.double()
            ratio = torch.linalg.lstsq(own, block).solution  # block = own @ ratio?
            assert float((own @ ratio - block).norm()) > 1e-3 * float(block.norm()), start
