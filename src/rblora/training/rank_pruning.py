"""HETLoRA's local rank self-pruning: a penalty on the last components of a client's LoRA, and
the rule that drops them.

Source: Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models" (EMNLP 2024, arXiv 2401.06432), Sec. 3 "local rank self-pruning":
a client adds to its local objective a regulariser, weighted by ``lambda``, on the norm of the
last components of its LoRA (columns of B, rows of A beyond a reduced rank set by a decay
factor ``gamma < 1``), and prunes those components when their norm has become small, so a
client whose data need less than its rank reports a smaller one.

**What we could and could not read.** The search tool gave us the paper's abstract, its
Figure 2 caption and third-party summaries; none of them gives the regulariser's exact formula
or the pruning threshold. The formulas below are therefore **our reading**, the nearest we can
justify from those sources, and are marked as ours:

- reduced rank (ours): ``r' = max(1, floor(gamma * r))`` for a client of rank ``r`` and
  ``0 < gamma < 1``; the *tail* is components ``r'..r-1`` (0-based);
- regulariser (ours, the paper's "norm of the last components" as the Frobenius norm of the
  tail's own update, scale folded in): per module ``||s B[:, r':] @ A[r':, :]||_F``, summed over
  the adapted modules, times ``lambda``; it is added to every optimizer step's loss (the data
  loss is a mean over the step's terms, so the penalty's weight does not depend on the batch
  size);
- pruning rule (ours, the paper's "pruned when small" read without state kept between rounds):
  after local training the client prunes to ``r'`` when the tail's norm (summed over modules)
  is strictly smaller than it was at the start of the round (the adapter it received), i.e. the
  penalty has won against the data over the round. A tail that starts at zero (round 1, B = 0)
  is never pruned: there is nothing to compare with.

The functions here are local training only (no federation): :func:`tail_norm` on factors,
:func:`tail_penalty` on a PEFT model (a ``penalty`` for :func:`rblora.training.train_local`),
:func:`should_prune` and :func:`prune_factors`, and :class:`RoundPruning`, what a task does
with them over one round. In a run they are ``--hetlora_lambda`` and ``--hetlora_prune_gamma``
(``TrainConfig.prune_lambda`` / ``prune_gamma``; lambda 0 turns pruning off) for a method that
declares ``local_rank_pruning`` (HETLoRA): a pruned client replies at its smaller rank, which
the server accepts for that method only (:meth:`rblora.protocol.factors.FactorPlan.check_rank`).
The pruning lasts one round (ours: no state between rounds): the next round starts again at
the client's rank.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

TINY = 1e-30
"""Squared norms below this count as zero: the penalty's gradient there is 0 (the norm's own
gradient at 0 is not defined)."""


def check_lambda(value: object) -> float:
    """``value`` as a finite float >= 0; ValueError naming the value otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(
            f"hetlora_lambda {value!r} must be a finite number >= 0: the weight of the penalty "
            "on the norm of the LoRA's last components"
        )
    return float(value)


def check_gamma(value: object) -> float:
    """``value`` as a float in (0, 1); ValueError naming the value otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and 0 < value < 1):
        raise ValueError(
            f"hetlora_prune_gamma {value!r} must be a fraction in (0, 1): the share of a "
            "client's rank kept when it prunes"
        )
    return float(value)


def kept_rank(rank: int, gamma: float) -> int:
    """``max(1, floor(gamma * rank))``: the rank a client of ``rank`` prunes to (ours)."""
    return max(1, math.floor(check_gamma(gamma) * int(rank)))


def tail_norm(factors: Iterable[tuple[Tensor, Tensor, float]], gamma: float) -> Tensor:
    """``sum_m ||s_m B_m[:, r'_m:] @ A_m[r'_m:, :]||_F`` over ``(A: (r, d_in), B: (d_out, r),
    s)`` triples, ``r'_m = kept_rank(r_m, gamma)``: a 0-d float32 tensor that carries gradients
    to the factors. Computed from the ``t x t`` Gram products of the tail (``t = r - r'``),
    never the ``(d_out, d_in)`` matrix; a zero tail contributes 0 and no gradient."""
    total = None
    for a, b, s in factors:
        keep = kept_rank(a.shape[0], gamma)
        ta, tb = a[keep:].float(), b[:, keep:].float() * float(s)
        sq = ((tb.T @ tb) * (ta @ ta.T)).sum()
        term = torch.where(sq > TINY, sq.clamp_min(TINY).sqrt(), sq.new_zeros(()))
        total = term if total is None else total + term.to(total.device)
    return torch.zeros(()) if total is None else total


def model_factors(model: nn.Module) -> list[tuple[Tensor, Tensor, float]]:
    """The live ``(A, B, scale)`` of every LoRA layer of a PEFT ``model`` (parameters, not
    copies: a penalty computed from them trains them)."""
    from rblora.adapters.lora import _ADAPTER, lora_layers

    return [
        (layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight, layer.scaling[_ADAPTER])
        for layer in lora_layers(model).values()
    ]


def tail_penalty(lam: float, gamma: float):
    """A ``penalty(model) -> lambda * tail_norm`` for :func:`rblora.training.train_local`."""
    lam, gamma = check_lambda(lam), check_gamma(gamma)

    def penalty(model: nn.Module) -> Tensor:
        return lam * tail_norm(model_factors(model), gamma)

    return penalty


def should_prune(start: float, end: float) -> bool:
    """The pruning rule (ours): the tail's norm at the end of local training ``end`` is
    strictly below its norm at the start ``start`` (never when ``start`` is 0)."""
    return start > 0 and end < start


def prune_factors(
    factors: Mapping[str, tuple[Tensor, Tensor]], gamma: float, scale: Callable[[int], float]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each module's first ``r' = kept_rank(r, gamma)`` components, ``A[:r']`` and
    ``B[:, :r'] * scale(r) / scale(r')`` (new tensors), so that held at rank ``r'`` (PEFT scale
    ``scale(r')``, e.g. ``lora_alpha / r'``) they give the update of the kept head,
    ``scale(r) B[:, :r'] @ A[:r']``: pruning drops the tail and changes nothing else."""
    out = {}
    for module, (a, b) in factors.items():
        rank = a.shape[0]
        keep = kept_rank(rank, gamma)
        out[module] = (a[:keep].clone(), b[:, :keep] * (float(scale(rank)) / float(scale(keep))))
    return out


class RoundPruning:
    """One client's rank self-pruning over one round of local training: :meth:`begin` reads
    the tail's norm of the adapter it starts from, :attr:`penalty` goes to ``train_local``,
    :meth:`finish` applies the pruning rule to the trained factors."""

    def __init__(self, lam: float, gamma: float, start: float) -> None:
        self.lam, self.gamma, self.start = lam, gamma, start
        self.penalty = tail_penalty(lam, gamma)
        self.end: float | None = None

    @classmethod
    def begin(cls, model: nn.Module, lam: float, gamma: float) -> RoundPruning | None:
        """None when ``lam`` is 0 (no penalty, no pruning)."""
        if check_lambda(lam) == 0:
            return None
        with torch.no_grad():
            start = float(tail_norm(model_factors(model), gamma))
        return cls(lam, check_gamma(gamma), start)

    def finish(
        self,
        model: nn.Module,
        factors: Mapping[str, tuple[Tensor, Tensor]],
        scale: Callable[[int], float],
    ) -> Mapping[str, tuple[Tensor, Tensor]]:
        """``factors`` (the trained ones, read from ``model``) pruned to the kept rank when
        :func:`should_prune` says so, else as they are."""
        with torch.no_grad():
            self.end = float(tail_norm(model_factors(model), self.gamma))
        if should_prune(self.start, self.end):
            return prune_factors(factors, self.gamma, scale)
        return factors
