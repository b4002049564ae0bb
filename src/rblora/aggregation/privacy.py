"""Client-level differential privacy for heterogeneous-rank aggregation (DP-FedAvg style).

Source: McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models" (ICLR 2018): clip each client's contribution, sum with weights that do not depend on
who participates (the fixed-denominator estimator), add Gaussian noise of standard deviation
``z * C``; the accountant (not here: ``rblora.federation.privacy``) turns ``(q, z, rounds)``
into epsilon.

**A client's term** is exactly what it adds to the released global quantity under its method,
over every module and the dense extras together (one vector per client, the DP-FedAvg
convention of clipping the whole update):

- ``stack`` methods (RB-LoRA, FLoRA, FlexLoRA): per module ``T_k = Bh_k diag(g_k) A_k``
  (``d_out x d_in``; for RB-LoRA the rank-balanced weighted components, for FlexLoRA/FLoRA
  ``p_k dW_k``), released as the dense sum ``sum_k T_k + noise``. Its norm comes from ``r x r``
  products, ``||Bh diag(g) A||_F^2 = sum(G_B * (A A^T))`` with
  ``G_B = (Bh diag g)^T (Bh diag g)``, never from the ``d_out x d_in`` product;
- ``padded`` methods (Uniform/Weighted HETLoRA, FedIT, RB-LoRA (factor)): their global update is
  a product of averaged factors ``B_g @ A_g``, not a sum of per-client updates, but ``A_g`` and
  ``B_g`` are sums of per-client terms ``(diag(g_k) A_k, Bh_k diag(g_k))``; those are clipped and
  the two factors released with noise (then ``B_g @ A_g`` is post-processing). Width: the
  population's largest rank, so the released shape does not depend on who took part;
- dense extras (a classification head): ``w_k X_k``, ``w_k = n_k / (q N)``.

Clipping multiplies the whole term by ``min(1, C / ||term||)``.

**Fixed denominator.** Client k's component weights are the method's own weights computed over
the whole configured population (``ranks``, ``num_examples`` of every client, participating or
not), divided by the sampling rate ``q``: ``g_k = gamma^pop_k / q``. For FlexLoRA
``g_k = n_k / (q N)``; for RB-LoRA ``g_kj = n_k / (q sum_{k': r_k' > j} n_k')`` over the
population. They do not depend on who participates, so adding or removing one client changes the
sum by that client's clipped term alone (norm <= C): the sensitivity is C. When each client takes
part with probability q, ``E[sum_{k in round} g_k x_k] = sum_k gamma^pop_k x_k``: the estimate is
unbiased for the method's population aggregate (its weights normalised over everyone); with
``q = 1`` the weights are exactly the non-private ones.

**Noise.** ``N(0, (z C)^2)`` on every released coordinate (every entry of each dense module sum,
or of both factors, and of the dense extras), drawn from a ``torch.Generator`` seeded by the
caller (the run seed and the round), in sorted module order, so a resumed run draws the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .api import _promoted_dtype
from .global_update import GlobalUpdate
from .registry import get_method, resolve_reduction
from .types import ClientUpdate, Method, ModuleDelta, assemble
from .validation import validate_updates


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP of one run: clip, noise and the population the weights are fixed by."""

    clip: float
    """``C``: the largest Frobenius norm of one client's term (all modules and dense extras)."""
    noise_multiplier: float
    """``z``: noise standard deviation ``z * C`` per released coordinate (0: clipping only)."""
    sample_rate: float
    """``q``: the fraction of the population selected each round, in (0, 1]."""
    ranks: tuple[int, ...]
    """Every configured client's rank, in client-id order."""
    num_examples: tuple[int, ...]
    """Every configured client's training examples (the server's own knowledge), same order."""

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"dp clip {self.clip!r} must be a finite number > 0")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"dp noise multiplier {self.noise_multiplier!r} must be >= 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"dp sample rate {self.sample_rate!r} must be in (0, 1]")
        if len(self.ranks) != len(self.num_examples) or not self.ranks:
            raise ValueError("dp: give one rank and one example count per configured client")
        if min(self.ranks) < 1 or min(self.num_examples) < 1:
            raise ValueError(f"dp: ranks {self.ranks} and sizes {self.num_examples} must be >= 1")

    @property
    def noise_std(self) -> float:
        """``z * C``."""
        return self.noise_multiplier * self.clip


@dataclass(frozen=True)
class ClipReport:
    """What clipping did in one aggregation, client by client (in the order given)."""

    norms: tuple[float, ...]
    """Each client's term norm before clipping."""
    factors: tuple[float, ...]
    """Each client's clip factor ``min(1, C / norm)``."""

    @property
    def clipped(self) -> int:
        """How many clients were scaled down."""
        return sum(1 for f in self.factors if f < 1)


def check_private(method: str, reduction: str | None) -> Method:
    """The method, if client-level DP applies to it with this redistribution; else ValueError.

    A ``stack`` method's noised update is dense, so its ``truncate`` redistribution (the first r
    stacked components) has nothing to cut: refused (use ``svd`` or ``merge``)."""
    spec = get_method(method)
    reduction = resolve_reduction(spec, reduction)
    if spec.form == "stack" and reduction == "truncate":
        raise ValueError(
            f"{spec.name} with --reduction_method truncate cannot be made differentially private: "
            "its noised update is dense and has no stacked components to truncate; use svd or "
            "merge"
        )
    return spec


def fixed_weights(spec: Method, dp: ClientDP) -> Tensor:
    """``(K_pop, R_pop)`` float64: the method's weights over the whole population, divided by
    the sampling rate (module docstring)."""
    return spec.weights(list(dp.ranks), list(dp.num_examples)) / dp.sample_rate


def term_norm_sq(form: str, a: Tensor, bh: Tensor, g: Tensor) -> float:
    """Squared Frobenius norm of one module's term of one client, from ``r x r`` products.

    ``a: (r, d_in)``, ``bh: (d_out, r)``, ``g: (r,)`` weights. ``stack``: ``||bh diag(g) a||^2``;
    ``padded``: ``||diag(g) a||^2 + ||bh diag(g)||^2``."""
    a, bh, g = a.double(), bh.double(), g.double()
    if form == "stack":
        bg = bh * g[None, :]
        return float(((bg.T @ bg) * (a @ a.T)).sum())
    return float((g.square() * (a.square().sum(dim=1) + bh.square().sum(dim=0))).sum())


@torch.no_grad()
def private_aggregate(
    method: str,
    updates: Sequence[ClientUpdate],
    dp: ClientDP,
    *,
    seed: int,
    reduction: str | None = None,
) -> tuple[GlobalUpdate, ClipReport]:
    """Aggregate with client-level DP: fixed weights, per-client clipping, Gaussian noise.

    Args:
        method: as :func:`rblora.aggregation.aggregate`.
        updates: this round's clients; ``client_id`` must be the client's index in the
            population (0..K-1), its rank and ``num_examples`` those of ``dp``.
        dp: the clip, noise and population.
        seed: seeds the noise (and the randomized SVD of the noised update).
        reduction: as :func:`rblora.aggregation.aggregate`.

    Returns:
        The noised global update (``stack`` methods: one dense ``(d_out, d_in)`` per module) and
        what clipping did. Noise is drawn in float32 (float64 if any input is).
    """
    spec = check_private(method, reduction)
    reduction = resolve_reduction(spec, reduction)
    shapes = validate_updates(updates)
    ids = _population_ids(updates, dp)
    gamma = fixed_weights(spec, dp)
    total_n = float(sum(dp.num_examples))
    out_dtype = _promoted_dtype(updates)
    work = torch.float64 if out_dtype == torch.float64 else torch.float32

    scaled = [{m: u.scaled_factors(m, work) for m in shapes} for u in updates]
    dense_w = [dp.num_examples[k] / (dp.sample_rate * total_n) for k in ids]
    norms, clips = [], []
    for u, k, factors, w in zip(updates, ids, scaled, dense_w, strict=True):
        g = gamma[k]
        sq = sum(term_norm_sq(spec.form, a, bh, g[: a.shape[0]]) for a, bh in factors.values())
        sq += sum(w * w * float(t.double().square().sum()) for t in u.dense.values())
        norm = math.sqrt(sq)
        norms.append(norm)
        clips.append(min(1.0, dp.clip / norm) if norm > 0 else 1.0)
    rows = torch.stack([gamma[k] * c for k, c in zip(ids, clips, strict=True)])

    generator = torch.Generator().manual_seed(int(seed))
    std = dp.noise_std
    held: dict[str, ModuleDelta] = {}
    for m in sorted(shapes):
        As = [f[m][0] for f in scaled]
        Bhs = [f[m][1] for f in scaled]
        a_g, b_g = assemble(spec.form, As, Bhs, rows)
        if spec.form == "stack":
            value: ModuleDelta = b_g @ a_g
            if std > 0:
                value += std * _gaussian(value, generator)
        else:
            if std > 0:
                a_g += std * _gaussian(a_g, generator)
                b_g += std * _gaussian(b_g, generator)
            value = (a_g, b_g)
        held[m] = value
    dense = {}
    for name in sorted(updates[0].dense):
        tensors = [u.dense[name].detach().to("cpu") for u in updates]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        total = torch.zeros(tensors[0].shape, dtype=dtype)
        for w, c, t in zip(dense_w, clips, tensors, strict=True):
            total += (w * c) * t.to(dtype)
        if std > 0:
            total += std * _gaussian(total, generator)
        dense[name] = total
    report = ClipReport(tuple(norms), tuple(clips))
    return GlobalUpdate(spec.name, reduction, held, out_dtype, dense, sketch_seed=seed), report


def _gaussian(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal draws of ``like``'s shape and dtype from ``generator``."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype)


def _population_ids(updates: Sequence[ClientUpdate], dp: ClientDP) -> list[int]:
    """Each update's client index in the population, checked against ``dp``."""
    ids = []
    for i, u in enumerate(updates):
        k = u.client_id
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(dp.ranks):
            raise ValueError(
                f"{u.describe(i)}: under DP client_id must be the client's index 0.."
                f"{len(dp.ranks) - 1} in the configured population"
            )
        if k in ids:
            raise ValueError(f"{u.describe(i)}: client {k} sent two updates")
        rank = {u.rank(m) for m in u.factors}
        if rank and rank != {dp.ranks[k]}:
            raise ValueError(f"{u.describe(i)}: rank {sorted(rank)}, population has {dp.ranks[k]}")
        if int(u.num_examples) != dp.num_examples[k]:
            raise ValueError(
                f"{u.describe(i)}: {u.num_examples} examples, population has {dp.num_examples[k]}"
            )
        ids.append(k)
    return ids
