"""HETLoRA as published (Cho et al., EMNLP 2024): sparsity weights and aggregation by hand."""

from __future__ import annotations

import pytest
import torch

from rblora.aggregation import ClientUpdate, aggregate, get_method
from rblora.aggregation.hetlora import sparsity_weights, update_norm
from rblora.aggregation.privacy import check_private

M = "layer.q"


def t(rows):
    return torch.tensor(rows)


def two_clients():
    # client 1: rank 1, lora_alpha 1 (s = 1): dW1 = [[2, 0], [0, 0]], ||dW1|| = 2
    # client 2: rank 2, lora_alpha 2 (s = 1): dW2 = B2 @ I = [[0, 0], [0, 1]], ||dW2|| = 1
    a1, b1 = t([[1.0, 0.0]]), t([[2.0], [0.0]])
    a2, b2 = torch.eye(2), t([[0.0, 0.0], [0.0, 1.0]])
    return [
        ClientUpdate(num_examples=5, lora_alpha=1.0, factors={M: (a1, b1)}),
        ClientUpdate(num_examples=1, lora_alpha=2.0, factors={M: (a2, b2)}),
    ]


def test_sparsity_weights_are_the_normalised_frobenius_norms_by_hand():
    c = two_clients()
    As = [u.factors[M][0] for u in c]
    Bhs = [u.scaled_factors(M, torch.float64)[1] for u in c]
    assert update_norm(As[0], Bhs[0]) == pytest.approx(2.0)
    assert update_norm(As[1], Bhs[1]) == pytest.approx(1.0)
    # w = (2, 1) / 3, whatever the data sizes (5 and 1)
    torch.testing.assert_close(sparsity_weights(As, Bhs), t([2 / 3, 1 / 3]).double())
    # the norm is the dense one, from the factors (a generic case)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=gen), torch.randn(5, 3, generator=gen)
    assert update_norm(a, b) == pytest.approx(float(torch.linalg.norm(b @ a)), rel=1e-6)


def test_all_zero_updates_weigh_uniformly():
    As = [torch.ones(1, 2), torch.ones(2, 2)]
    Bhs = [torch.zeros(3, 1), torch.zeros(3, 2)]
    torch.testing.assert_close(sparsity_weights(As, Bhs), t([0.5, 0.5]).double())


def test_hetlora_aggregates_the_padded_factors_by_sparsity_by_hand():
    # Abar = 2/3 [[1, 0], [0, 0]] + 1/3 I = [[1, 0], [0, 1/3]]
    # Bbar = 2/3 [[2, 0], [0, 0]] + 1/3 [[0, 0], [0, 1]] = [[4/3, 0], [0, 1/3]]
    g = aggregate("HETLoRA", two_clients())
    torch.testing.assert_close(g.delta(M), t([[4 / 3, 0.0], [0.0, 1 / 9]]))
    # truncate to rank 1, lora_alpha 4 (s = 4): A = Abar[:1], B = Bbar[:, :1] / 4
    a, b = g.for_client(1, 4.0)[M]
    torch.testing.assert_close(a, t([[1.0, 0.0]]))
    torch.testing.assert_close(b, t([[1 / 3], [0.0]]))
    # the zero-padding variant with data weights (5/6, 1/6) gives another update
    w = aggregate("Weighted HETLoRA", two_clients())
    assert not torch.allclose(w.delta(M), g.delta(M))


def test_names_and_dp_refusal():
    assert get_method("HetLoRA-published").name == "HETLoRA"
    assert get_method("hetlora").name == "HETLoRA"
    assert get_method("Weighted HETLoRA").name == "Weighted HETLoRA"
    with pytest.raises(ValueError, match="HETLoRA cannot be made differentially private") as e:
        check_private("HETLoRA", None)
    assert "\n" not in str(e.value) and "up to 2C" in str(e.value)


def test_one_client_moves_the_sparsity_weighted_release_by_more_than_its_clip():
    """Why DP is refused. The release of a padded method is the pair (Abar, Bbar); client-level
    DP clips each client's term (A_k, Bh_k) to C and calibrates the noise to "one client moves
    the release by at most C", which holds for fixed weights. HETLoRA's weights are normalised
    by the round's own norms: here client 1's term sits at the clip C = sqrt(2), client 2's is
    under it, and removing client 1 moves the release by about sqrt(5) > C (every other
    client's weight changes with it). The move stays below 2C (weights on the simplex), but the
    mechanism's noise and accounting are for C."""
    eps = 1e-3
    one = ClientUpdate(num_examples=1, lora_alpha=1.0, factors={M: (t([[1.0]]), t([[1.0]]))})
    two = ClientUpdate(num_examples=1, lora_alpha=1.0, factors={M: (t([[-1.0]]), t([[-eps]]))})
    clip = 2**0.5
    assert float(torch.cat([t([1.0]), t([1.0])]).norm()) == pytest.approx(clip)
    both = aggregate("HETLoRA", [one, two]).factors(M)
    alone = aggregate("HETLoRA", [two]).factors(M)
    move = float(torch.cat([(x - y).flatten() for x, y in zip(both, alone, strict=True)]).norm())
    assert clip < move < 2 * clip
    assert move == pytest.approx(5**0.5, rel=1e-2)
