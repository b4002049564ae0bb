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
- a method that folds a residual into the base (FedEx-LoRA, ``padded``): its term is the pair
  of factor terms and its weighted update ``Bh_k diag(g_k) A_k``; the two factors and the
  dense sum of the updates are released with noise, and the residual (sum minus the product
  of the noised factors) is computed from them: post-processing, and dense;
- dense extras (a classification head): ``w_k X_k``, ``w_k = n_k / (q N)``;
- only the factors the method's client protocol sends in the round are released
  (:attr:`.types.ClientProtocol.sends`): a frozen A (FFA-LoRA) is the run's public seeded
  initialisation, held as it is, so a client's term is ``Bh_k diag(g_k)`` alone, and only
  ``B_g`` is noised; a held factor (RoLoRA) is the last release, public too, so in a round
  that trains B the term is ``Bh_k diag(g_k)`` and in one that trains A it is
  ``diag(g_k) A_k``, and only that factor is noised.

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
or of both factors, and of the dense extras), in sorted module order, from a generator the caller
derives from a **secret key** (:func:`new_noise_key`, :func:`secret_generator`): 256 bits from
the operating system's CSPRNG that only the server holds. Anyone who could re-draw the noise
could subtract it and read the clipped sum; a run seed, which is public, must never seed it.

**An empty round** (Poisson sampling selected nobody) releases the noise alone: the shapes come
from the caller (``shapes``, ``dense_shapes``), not from the updates.

**Adaptive clipping** (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021): :class:`AdaptiveClip` moves C geometrically toward the
``gamma``-quantile of the clients' term norms from a noised count of the unclipped clients;
:func:`update_noise_multiplier` splits one noise multiplier between the update and that count.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .global_update import GlobalUpdate
from .registry import get_method, resolve_reduction
from .streaming import RoundSum, residual_of
from .types import DEFAULT_SVD_ENERGY, ClientUpdate, HeldSource, Method, ModuleDelta
from .validation import validate_update

KEY_BYTES = 32
"""Length of a noise key: 256 bits from the operating system's CSPRNG."""


def new_noise_key() -> bytes:
    """A fresh secret noise key: :data:`KEY_BYTES` bytes from :func:`secrets.token_bytes` (the
    operating system's CSPRNG)."""
    return secrets.token_bytes(KEY_BYTES)


def secret_generator(key: bytes, *path: int) -> np.random.Generator:
    """An independent stream of random numbers for ``path`` (a round, a purpose, ...) that
    only a holder of ``key`` can reproduce.

    All 256 bits of the key and the path enter a ``numpy.random.SeedSequence`` with a 256-bit
    entropy pool, which seeds a ``PCG64DXSM`` generator (128-bit state, 128-bit stream): distinct
    paths give independent streams, and without the key the streams cannot be enumerated (a
    31- or 64-bit seed could be). Reproducible for the same key and path (a resumed run)."""
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError("a noise key must be at least 16 bytes (128 bits)")
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in path):
        raise ValueError(f"stream path {path!r} must be integers >= 0")
    entropy = int.from_bytes(key, "big")
    sequence = np.random.SeedSequence(entropy, spawn_key=tuple(path), pool_size=8)
    return np.random.Generator(np.random.PCG64DXSM(sequence))


def gaussian(generator: np.random.Generator, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Standard normal draws of ``shape`` from ``generator`` as a CPU tensor of ``dtype``
    (float32 or float64)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    draws = generator.standard_normal(tuple(int(d) for d in shape), dtype=np_dtype)
    return torch.from_numpy(draws).to(dtype)


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP of one aggregation: clip, noise and the population the weights are fixed
    by."""

    clip: float
    """``C``: the largest Frobenius norm of one client's term (all modules and dense extras)."""
    noise_multiplier: float
    """``z``: noise standard deviation ``z * C`` per released coordinate (0: clipping only)."""
    sample_rate: float
    """``q``: the fraction of the population expected each round, in (0, 1] (the weights'
    fixed denominator: ``g_k = gamma_k / q``)."""
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
    """What clipping did in one aggregation, client by client (in the order given). Computed
    from the clients' raw updates: the server's private knowledge, never released."""

    clip: float
    """The clip ``C`` this aggregation used."""
    norms: tuple[float, ...]
    """Each client's term norm before clipping."""
    factors: tuple[float, ...]
    """Each client's clip factor ``min(1, C / norm)``."""

    @property
    def clipped(self) -> int:
        """How many clients were scaled down."""
        return sum(1 for f in self.factors if f < 1)

    @property
    def unclipped(self) -> int:
        """How many clients' terms were at most C (the count adaptive clipping follows)."""
        return sum(1 for n in self.norms if n <= self.clip)


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping (Andrew et al., NeurIPS 2021, Algorithm 1 with the geometric update).

    Each round the server counts the clients whose term norm is at most the current clip,
    ``b = sum_i 1[||term_i|| <= C]``, releases it with Gaussian noise, and moves the clip::

        b~ = (b + N(0, count_stddev^2)) / expected_clients
        C' = C * exp(-learning_rate * (b~ - quantile))

    so C follows the ``quantile`` of the norms (more unclipped than asked: C shrinks). The count
    has sensitivity 1/2 once centred (each ``b_i - 1/2`` changes by at most 1/2 when a client is
    added or removed); its cost enters the accounting through :func:`update_noise_multiplier`.
    """

    quantile: float
    """``gamma``: the fraction of clients whose term should stay unclipped, in (0, 1)."""
    learning_rate: float
    """``eta_C`` of the geometric update (> 0)."""
    count_stddev: float
    """``sigma_b``: standard deviation of the noise on the count (>= 0)."""
    expected_clients: float
    """``m``: the clients a round is expected to hold (``q K``), the count's fixed
    denominator."""

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"dp clip quantile {self.quantile!r} must be in (0, 1)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"dp clip learning rate {self.learning_rate!r} must be > 0")
        if not (self.count_stddev >= 0 and math.isfinite(self.count_stddev)):
            raise ValueError(f"dp clip count stddev {self.count_stddev!r} must be >= 0")
        if not self.expected_clients > 0:
            raise ValueError(f"expected clients {self.expected_clients!r} must be > 0")

    def next_clip(self, clip: float, unclipped: int, standard_normal: float) -> float:
        """The clip of the next round, from this round's ``clip``, its count of ``unclipped``
        clients and one standard normal draw (scaled by :attr:`count_stddev` here)."""
        noised = (unclipped + self.count_stddev * standard_normal) / self.expected_clients
        return clip * math.exp(-self.learning_rate * (noised - self.quantile))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier of the update when adaptive clipping spends part of
    ``noise_multiplier`` on the count (Andrew et al., Theorem 1): releasing the update with
    ``z_u`` and the count with ``sigma_b`` costs what one Gaussian mechanism with
    ``z = (z_u^-2 + (2 sigma_b)^-2)^-1/2`` costs, so ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2``.
    ``0`` for ``z = 0`` (clipping only). ValueError when ``2 sigma_b <= z`` (the count alone
    would need all the budget)."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping: the count's noise stddev {count_stddev:.4g} is too small for "
            f"the noise multiplier {noise_multiplier:.4g} (it must exceed z / 2 = "
            f"{noise_multiplier / 2:.4g}); give a larger --dp_clip_count_stddev, more clients a "
            "round, or a fixed --dp_clip without --dp_clip_quantile"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def check_private(method: str, reduction: str | None) -> Method:
    """The method, if client-level DP applies to it with this redistribution; else ValueError.

    A ``stack`` method's noised update is dense, so its ``truncate`` redistribution (the first r
    stacked components) has nothing to cut: refused (use ``svd`` or ``merge``)."""
    spec = get_method(method)
    if spec.dp_note:
        raise ValueError(f"{spec.name} cannot be made differentially private: {spec.dp_note}")
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


def term_norm_sq(
    form: str, a: Tensor, bh: Tensor, g: Tensor, sends: Sequence[str] = ("A", "B")
) -> float:
    """Squared Frobenius norm of one module's term of one client, from ``r x r`` products.

    ``a: (r, d_in)``, ``bh: (d_out, r)``, ``g: (r,)`` weights. ``stack``: ``||bh diag(g) a||^2``;
    ``padded``: the sum over the factors released (``sends``) of ``||diag(g) a||^2`` and
    ``||bh diag(g)||^2``."""
    a, bh, g = a.double(), bh.double(), g.double()
    if form == "stack":
        bg = bh * g[None, :]
        return float(((bg.T @ bg) * (a @ a.T)).sum())
    per_component = torch.zeros_like(g)
    if "A" in sends:
        per_component += a.square().sum(dim=1)
    if "B" in sends:
        per_component += bh.square().sum(dim=0)
    return float((g.square() * per_component).sum())


class PrivateRoundSum:
    """One round's private aggregation, folded in as the updates arrive: each update is clipped
    with the population's fixed weights (its own term's norm needs nothing of the others) and
    added to :class:`.streaming.RoundSum`'s sums; :meth:`finish` adds the noise.

    Args: as :func:`private_aggregate` (``shapes``/``dense_shapes``: the release's, needed
    when no update may arrive)."""

    def __init__(
        self,
        method: str,
        dp: ClientDP,
        *,
        reduction: str | None = None,
        shapes: Mapping[str, tuple[int, int]] | None = None,
        dense_shapes: Mapping[str, Sequence[int]] | None = None,
        held: HeldSource | None = None,
        svd_energy: float = DEFAULT_SVD_ENERGY,
        round_: int = 1,
    ) -> None:
        self.spec = check_private(method, reduction)
        self.protocol = self.spec.protocol.at(round_)
        """The method's client protocol of this round: what its clients send is released."""
        self.reduction = resolve_reduction(self.spec, reduction)
        self.dp = dp
        self.gamma = fixed_weights(self.spec, dp)
        self.total_n = float(sum(dp.num_examples))
        self.sum = RoundSum(
            self.spec, self.reduction, ranks=dp.ranks, normalise=False, shapes=shapes,
            dense_shapes=dense_shapes, held=held, svd_energy=svd_energy, round_=round_,
        )  # fmt: skip
        self.norms: list[float] = []
        self.factors: list[float] = []

    @torch.no_grad()
    def add(self, update: ClientUpdate) -> None:
        """Clip one client's whole term to C and fold it in (ValueError naming a client whose
        id, rank or example count is not the population's, or whose update does not fit)."""
        index = self.sum.count
        k = _population_id(update, index, self.dp)
        if self.sum.shapes or self.sum.dense_shapes:
            validate_update(update, index, self.sum.shapes, self.sum.dense_shapes)
        work = torch.float64 if any(
            t.dtype == torch.float64 for pair in update.factors.values() for t in pair
        ) else torch.float32  # fmt: skip
        g = self.gamma[k]
        w = self.dp.num_examples[k] / (self.dp.sample_rate * self.total_n)
        sq = 0.0
        for module in update.factors:
            a, bh = update.scaled_factors(module, work)
            sq += term_norm_sq(self.spec.form, a, bh, g[: a.shape[0]], self.protocol.sends)
            if self.spec.residual:  # the weighted update itself is released too (dense)
                sq += term_norm_sq("stack", a, bh, g[: a.shape[0]])
        sq += sum(w * w * float(t.double().square().sum()) for t in update.dense.values())
        norm = math.sqrt(sq)
        clip = min(1.0, self.dp.clip / norm) if norm > 0 else 1.0
        rank = max((update.rank(m) for m in update.factors), default=0)
        self.sum.add(update, weights=g[:rank] * clip, dense_weight=w * clip)
        self.norms.append(norm)
        self.factors.append(clip)

    @torch.no_grad()
    def finish(
        self, noise: np.random.Generator | None, *, sketch_seed: int = 0
    ) -> tuple[GlobalUpdate, ClipReport]:
        """The noised release (``stack``: one dense ``(d_out, d_in)`` per module) and what
        clipping did. Noise in sorted module order (each dense sum, or A then B), then the
        dense extras; drawn in float32 (float64 if any input was)."""
        std = self.dp.noise_std
        if std > 0 and noise is None:
            raise ValueError("private_aggregate: a noise multiplier > 0 needs the noise generator")
        if not self.sum.shapes and not self.sum.dense_shapes:
            raise ValueError(
                "private_aggregate: no client took part, so the release's shapes must be given "
                "(shapes, dense_shapes)"
            )
        held: dict[str, ModuleDelta] = {}
        sums = self.sum.stack_sums() if self.spec.residual else {}
        residual: dict[str, ModuleDelta] = {}
        for module, value in self.sum.held().items():
            if self.spec.form == "stack":
                if not torch.is_tensor(value):  # a stack narrower than the matrix: its sum
                    value = value[1] @ value[0]
                if std > 0:
                    value += std * gaussian(noise, value.shape, value.dtype)
            else:
                a_g, b_g = value
                if std > 0 and "A" in self.protocol.sends:
                    a_g += std * gaussian(noise, a_g.shape, a_g.dtype)
                if std > 0 and "B" in self.protocol.sends:
                    b_g += std * gaussian(noise, b_g.shape, b_g.dtype)
                value = (a_g, b_g)
                if module in sums:  # the released sum of updates, then the residual from it
                    total = sums[module]
                    if not torch.is_tensor(total):
                        total = total[1] @ total[0]
                    if std > 0:
                        total += std * gaussian(noise, total.shape, total.dtype)
                    residual[module] = residual_of(total, a_g, b_g)
            held[module] = value
        dense = self.sum.dense_extras()
        for name in sorted(dense):
            if std > 0:
                dense[name] += std * gaussian(noise, dense[name].shape, dense[name].dtype)
        report = ClipReport(self.dp.clip, tuple(self.norms), tuple(self.factors))
        release = GlobalUpdate(
            self.spec.name, self.reduction, held, self.sum.out_dtype, dense,
            sketch_seed=sketch_seed, noised=std > 0, svd_energy=self.sum.svd_energy,
            residual=residual or None,
        )  # fmt: skip
        return release, report


@torch.no_grad()
def private_aggregate(
    method: str,
    updates: Sequence[ClientUpdate],
    dp: ClientDP,
    *,
    noise: np.random.Generator | None,
    reduction: str | None = None,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    dense_shapes: Mapping[str, Sequence[int]] | None = None,
    sketch_seed: int = 0,
    held: HeldSource | None = None,
    svd_energy: float = DEFAULT_SVD_ENERGY,
    round_: int = 1,
) -> tuple[GlobalUpdate, ClipReport]:
    """Aggregate with client-level DP: fixed weights, per-client clipping, Gaussian noise.

    Args:
        method: as :func:`rblora.aggregation.aggregate`.
        updates: this round's clients (may be empty: the noise alone is released);
            ``client_id`` must be the client's index in the population (0..K-1), its rank and
            ``num_examples`` those of ``dp``.
        dp: the clip, noise and population.
        noise: the round's secret generator (:func:`secret_generator`); None only when ``dp``
            adds no noise.
        reduction: as :func:`rblora.aggregation.aggregate`.
        shapes: module -> ``(d_out, d_in)`` of the population's updates (the server's own
            knowledge); required when ``updates`` is empty, checked against them otherwise.
        dense_shapes: dense extra -> shape, likewise.
        sketch_seed: seeds the randomized SVD of the noised update (post-processing: it need
            not be secret).
        held: where the round's fixed factors come from (a frozen-A method: the run's frozen
            initialisation, and the released A is its rows at the population's width; a held
            factor: the server's start basis; see :class:`.streaming.RoundSum`).
        svd_energy: the ``threshold`` redistribution's energy (as ``aggregate``'s).
        round_: the round (1-based), for a protocol that changes with it (RoLoRA).

    Returns:
        The noised global update (``stack`` methods: one dense ``(d_out, d_in)`` per module) and
        what clipping did. Noise is drawn in float32 (float64 if any input is). The same as
        folding ``updates`` into a :class:`PrivateRoundSum` one by one.
    """
    total = PrivateRoundSum(
        method, dp, reduction=reduction, shapes=shapes, dense_shapes=dense_shapes, held=held,
        svd_energy=svd_energy, round_=round_,
    )  # fmt: skip
    for update in updates:
        total.add(update)
    return total.finish(noise, sketch_seed=sketch_seed)


def _population_id(u: ClientUpdate, index: int, dp: ClientDP) -> int:
    """The update's client index in the population, checked against ``dp``."""
    k = u.client_id
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(dp.ranks):
        raise ValueError(
            f"{u.describe(index)}: under DP client_id must be the client's index 0.."
            f"{len(dp.ranks) - 1} in the configured population"
        )
    rank = {u.rank(m) for m in u.factors}
    if rank and rank != {dp.ranks[k]}:
        raise ValueError(f"{u.describe(index)}: rank {sorted(rank)}, population has {dp.ranks[k]}")
    if int(u.num_examples) != dp.num_examples[k]:
        raise ValueError(
            f"{u.describe(index)}: {u.num_examples} examples, population has {dp.num_examples[k]}"
        )
    return k
