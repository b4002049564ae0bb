"""HETLoRA's local rank self-pruning (our reading, see rblora.training.rank_pruning): the
penalty and its gradient by hand, the pruning rule, the option checks, training with it."""

from __future__ import annotations

import pytest
import torch
from test_training_loop import examples, fp32
from tiny_models import build_tiny_llama

from rblora.adapters import LoraSpec, attach_lora, read_factors
from rblora.training import train_local
from rblora.training.rank_pruning import (
    check_gamma,
    check_lambda,
    kept_rank,
    model_factors,
    prune_factors,
    should_prune,
    tail_norm,
    tail_penalty,
)


def test_kept_rank_and_the_option_checks_name_the_bad_value():
    assert [kept_rank(r, 0.5) for r in (1, 2, 3, 8)] == [1, 1, 1, 4]
    assert kept_rank(8, 0.3) == 2
    for bad in (0, 1, 1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=rf"hetlora_prune_gamma {bad!r} must be a fraction"):
            check_gamma(bad)
    for bad in (-1, float("inf"), float("nan"), False):
        with pytest.raises(ValueError, match=rf"hetlora_lambda {bad!r} must be a finite number"):
            check_lambda(bad)
    assert check_lambda(0) == 0.0 and check_gamma(0.5) == 0.5


def test_the_penalty_and_its_gradient_by_hand():
    # rank 2, gamma 0.5: the tail is component 1, b = B[:, 1] = (0, 3), a = A[1] = (0, 2);
    # its update b a^T has norm |b| |a| = 6; d/db = |a| b / |b| = (0, 2), d/da = |b| a / |a| =
    # (0, 3); times lambda 0.5 and the scale 1. The head (component 0) gets no gradient.
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0], [0.0, 3.0]], requires_grad=True)
    norm = tail_norm([(a, b, 1.0)], 0.5)
    assert float(norm.detach()) == pytest.approx(6.0)
    (0.5 * norm).backward()
    torch.testing.assert_close(b.grad, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(a.grad, torch.tensor([[0.0, 0.0], [0.0, 1.5]]))
    # the scale multiplies the tail's update: s = 2 doubles the norm
    assert float(tail_norm([(a.detach(), b.detach(), 2.0)], 0.5)) == pytest.approx(12.0)


def test_the_penalty_is_the_dense_norm_and_a_zero_tail_has_no_gradient():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    norm = tail_norm([(a, b, 0.5)], 0.25)  # keeps 2, tail = components 2..7
    dense = torch.linalg.norm(0.5 * b[:, 2:] @ a[2:])
    assert float(norm.detach()) == pytest.approx(float(dense.detach()), rel=1e-6)
    ga, gb = torch.autograd.grad(norm, (a, b))
    da, db = torch.autograd.grad(dense, (a, b))
    torch.testing.assert_close(ga.double(), da, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), db, rtol=1e-5, atol=1e-6)
    zero_b = torch.zeros(5, 8, requires_grad=True)
    a32 = a.detach().float().requires_grad_()
    z = tail_norm([(a32, zero_b, 1.0)], 0.5)
    z.backward()
    assert float(z.detach()) == 0.0 and torch.equal(zero_b.grad, torch.zeros(5, 8))
    assert torch.isfinite(a32.grad).all()


def test_the_pruning_rule():
    assert should_prune(2.0, 1.0)  # the tail shrank over the round
    assert not should_prune(2.0, 2.0) and not should_prune(1.0, 3.0)
    assert not should_prune(0.0, 0.0)  # round 1: a fresh B, nothing to compare with


def test_pruned_factors_keep_the_head_s_update_at_the_smaller_rank():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 6, generator=g), torch.randn(5, 8, generator=g)
    alpha = 16.0
    (pa, pb) = prune_factors({"m": (a, b)}, 0.5, lambda r: alpha / r)["m"]
    assert pa.shape == (4, 6) and pb.shape == (5, 4)
    torch.testing.assert_close((alpha / 4) * pb @ pa, (alpha / 8) * b[:, :4] @ a[:4])


def test_training_with_the_penalty_shrinks_the_tail(tiny_tokenizer):
    """From the same start (a non-zero B), training with a strong penalty ends with a smaller
    tail than without, smaller than it started (so the rule prunes), and the reported losses are
    the data loss alone (the first step's, before any update, is the same)."""
    spec = LoraSpec(rank=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(9)
    init = {n: (a, torch.randn(b.shape, generator=g) * 0.05)
            for n, (a, b) in read_factors(attach_lora(build_tiny_llama(
                vocab_size=len(tiny_tokenizer)), spec, seed=1)).items()}  # fmt: skip
    cfg = fp32(micro_batch_size=4, batch_size=4, learning_rate=1e-2, num_epochs=2)
    ex = examples(tiny_tokenizer, 16)
    tails, losses = {}, {}
    for lam in (0.0, 10.0):
        pm = attach_lora(build_tiny_llama(vocab_size=len(tiny_tokenizer)), spec, init=init, seed=3)
        start = float(tail_norm(model_factors(pm), 0.5))
        res = train_local(pm, ex, cfg, pad_token_id=tiny_tokenizer.pad_token_id,
                          penalty=tail_penalty(lam, 0.5) if lam else None)  # fmt: skip
        with torch.no_grad():
            tails[lam] = float(tail_norm(model_factors(pm), 0.5))
        losses[lam] = res.losses
    assert start > 0
    assert tails[10.0] < tails[0.0] and should_prune(start, tails[10.0])
    assert losses[10.0][0] == pytest.approx(losses[0.0][0])
