"""Data types of the aggregation library: a client's update, a method, the global update.

Shapes follow PEFT: for a module with weight ``W0: (d_out, d_in)`` a rank-``r`` LoRA adapter is
``A: (r, d_in)``, ``B: (d_out, r)`` and its update is ``s * B @ A`` with the scale ``s`` given by
:func:`lora_scale` (the only place the scaling rule lives).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .linalg import held_rows, padded_component_sum, weighted_stack

FactorPair = tuple[Tensor, Tensor]
"""One module's LoRA factors ``(A, B)`` with ``A: (r, d_in)`` and ``B: (d_out, r)``."""

Factors = dict[str, FactorPair]
"""Per-module factors ``{module name: (A, B)}``. A client's adapter holds raw PEFT weights (the
scale :func:`lora_scale` is applied by PEFT, not stored); a global update's factors have the
scale folded into B (``dW = B @ A``)."""

ModuleDelta = FactorPair | Tensor
"""One module's update ``B @ A`` held as factors ``(A, B)`` or as a dense ``(d_out, d_in)``."""

REDUCTIONS = ("svd", "truncate", "merge", "threshold")
"""Redistribution rules: global update -> the adapter a client starts its next round from.

``threshold`` (FLoRIST, Ramesh and Dass, MLSys 2026; stack methods only): the SVD of the
update, ``dW = U diag(sigma) V^T`` (factored, as ``svd``), then per module one rank
``k = min{k : sigma_1^2 + ... + sigma_k^2 >= svd_energy * sum_i sigma_i^2}``
(:func:`.linalg.energy_rank`); a client of rank r starts from the first ``min(k, r)``
directions, ``A = V[:, :r]^T``, ``B = U[:, :min(k, r)] diag(sigma) / s_r`` and zero columns
beyond (its extra rows of A orthonormal and trainable). Clients of rank >= k thus all hold the
same rank-k adapter, the paper's global adapters shared by every client; a client of smaller
rank holds its best rank-r approximation, as under ``svd``."""

DEFAULT_SVD_ENERGY = 0.99
"""The fraction of an update's energy ``threshold`` keeps unless told (ours: FLoRIST's code
defaults to 0.9, and its tables tune 0.80-0.99 per model and data set)."""


def check_svd_energy(energy: object) -> float:
    """``energy`` as a float in (0, 1]; ValueError naming the value otherwise."""
    ok = isinstance(energy, numbers.Real) and not isinstance(energy, bool)
    if not (ok and math.isfinite(energy) and 0 < energy <= 1):
        raise ValueError(
            f"svd_energy {energy!r} must be a fraction in (0, 1]: the share of each module's "
            "energy (sum of squared singular values) the threshold redistribution keeps"
        )
    return float(energy)


def lora_scale(lora_alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``lora_alpha / rank``, or ``lora_alpha / sqrt(rank)`` with rsLoRA."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """One client's trained LoRA adapter and how much data produced it.

    Nothing is checked here; :func:`rblora.aggregation.aggregate` validates every field and names
    the client (its index and ``client_id``) in the error. Tensors are never modified.
    """

    num_examples: int
    """Training examples the client used (``n_k``, >= 1); sets the data weights."""
    lora_alpha: float
    """The client's PEFT ``lora_alpha`` (> 0)."""
    factors: Mapping[str, FactorPair]
    """Module name -> ``(A: (r, d_in), B: (d_out, r))``; the same module names on every client."""
    use_rslora: bool = False
    """True if the client's adapter uses rsLoRA scaling ``lora_alpha / sqrt(r)``."""
    client_id: str | None = None
    """Optional label used in error messages."""
    dense: Mapping[str, Tensor] = field(default_factory=dict)
    """Dense extra parameters trained in full beside the LoRA (PEFT's ``modules_to_save``, e.g.
    a classification head): parameter name -> tensor, the same names and shapes on every client;
    averaged by examples (FedAvg)."""

    def rank(self, module: str) -> int:
        """The client's LoRA rank ``r_k`` on ``module``."""
        return int(self.factors[module][0].shape[0])

    def scale(self, module: str) -> float:
        """The client's PEFT scale ``s_k`` on ``module``."""
        return lora_scale(self.lora_alpha, self.rank(module), self.use_rslora)

    def scaled_factors(self, module: str, dtype: torch.dtype) -> FactorPair:
        """``(A, Bh)`` in ``dtype`` with the scale folded into B: ``Bh = s_k * B``, so that
        ``dW_k = Bh @ A``. New tensors, except that A may be the caller's (never modified)."""
        a, b = self.factors[module]
        return a.to(dtype), b.to(dtype) * self.scale(module)

    def describe(self, index: int) -> str:
        """``"client 3 (id 'site-b')"``: how errors name this client."""
        label = "" if self.client_id is None else f" (id {self.client_id!r})"
        return f"client {index}{label}"


Weights = Callable[[Sequence[int], Sequence[int]], Tensor]
"""``weights(ranks, num_examples) -> gamma: (K, R)`` float64, ``R = max r_k``: the weight of
component j (row j of ``A_k``, column j of ``Bh_k``) of client k; entries with ``j >= r_k`` are
ignored. Computed from the clients given (normalised over them); client-level DP calls it on the
whole configured population instead (:mod:`.privacy`)."""

UpdateWeights = Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]
"""``update_weights(As, Bhs) -> w: (K,)`` float64: one weight per client of one module, computed
from the clients' own factors ``A_k: (r_k, d_in)`` and ``Bh_k = s_k B_k: (d_out, r_k)`` (every
component of client k weighs ``w[k]``): weights that depend on what the clients learned, not
only on their ranks and sizes (:attr:`Method.update_weights`)."""

Share = Callable[[int, int, int], tuple[Tensor, Tensor]]
"""``share(rank, num_examples, width) -> (raw, mass)``, each ``(width,)`` float64: a client's
unnormalised weight of each of its components (0 beyond its rank) and what it adds to each
component's denominator, so that ``gamma[k, j] = raw[k, j] / sum_k' mass[k', j]``. Both are the
client's own (its rank and examples), so a round can fold clients in one by one and divide at
the end (:mod:`.streaming`); ``mass`` may change in j only where a rank ends. Build a method's
``weights`` from it with :func:`weights_from_share`."""


def weights_from_share(share: Share) -> Weights:
    """The :data:`Weights` of a :data:`Share`: ``gamma = raw / sum_k mass`` over the clients
    given."""

    def weights(ranks: Sequence[int], num_examples: Sequence[int]) -> Tensor:
        width = max(ranks)
        pairs = [share(int(r), int(n), width) for r, n in zip(ranks, num_examples, strict=True)]
        raw = torch.stack([p[0] for p in pairs])
        mass = torch.stack([p[1] for p in pairs]).sum(dim=0)
        return raw / torch.where(mass > 0, mass, torch.ones_like(mass))[None, :]

    return weights


def data_share(rank: int, num_examples: int, width: int) -> tuple[Tensor, Tensor]:
    """FedAvg's weights ``p_k = n_k / N`` as a :data:`Share`: raw ``n_k`` on the client's
    components, mass ``n_k`` on every component (the denominator is all the examples)."""
    has = torch.arange(width) < rank
    return float(num_examples) * has.double(), torch.full((width,), float(num_examples),
                                                           dtype=torch.float64)  # fmt: skip


def holder_share(rank: int, num_examples: int, width: int) -> tuple[Tensor, Tensor]:
    """Rank-balanced weights ``n_k / sum_{k': r_k' > j} n_k'`` as a :data:`Share`: raw and mass
    ``n_k`` on the client's own components (component j's denominator is the examples of the
    clients that hold it)."""
    values = float(num_examples) * (torch.arange(width) < rank).double()
    return values, values.clone()


def count_share(rank: int, num_examples: int, width: int) -> tuple[Tensor, Tensor]:
    """Uniform weights ``1 / K`` as a :data:`Share`: raw 1 on the client's components, mass 1
    on every component."""
    return (torch.arange(width) < rank).double(), torch.ones(width, dtype=torch.float64)


FACTORS = ("A", "B")
"""The two LoRA factors, by PEFT's names: ``A: (r, d_in)`` (``lora_A``), ``B: (d_out, r)``."""

ROLES = ("shared", "frozen", "held", "local")
"""What a client does with one LoRA factor under a method (:class:`ClientProtocol`)."""


@dataclass(frozen=True)
class ClientProtocol:
    """What a client trains, sends and keeps in a round, factor by factor: the one declaration
    the round core, both engines, client-level DP and the checks read (no code branches on a
    method's name). A method whose protocol changes from round to round declares a
    :class:`ProtocolCycle` of them.

    Each factor has a role:

    - ``"shared"``: trained locally, sent to the server, aggregated, sent back (every method of
      the seed, for A and B);
    - ``"frozen"``: never trained and never sent, in either direction: fixed at a shared random
      initialisation drawn from the run's seed, the same for every client (a client of rank r
      holds its first r rows; :mod:`.frozen`), which the server and each client draw for
      themselves. Only A may be frozen (a frozen zero B would keep every update at zero);
    - ``"held"``: kept fixed for the round at the server's current global factor, the same for
      every client (a client of rank r holds its prefix; before any global factor exists, the
      run's seeded initialisation of a frozen A): sent down, not trained, not sent up; the
      server aggregates its own copy, never a client's (RoLoRA's alternating rounds);
    - ``"local"``: trained locally and kept by the client from the round it last trained to the
      next (a client that never trained starts it as PEFT does: B at zero), never sent in either
      direction and never seen by the server, which aggregates zeros in its place (FedSA-LoRA's
      B). Only B may be local (a local A would start at zero too, and so would every update).
      A method with a local factor has no global model: each client's model is the shared
      factors with its own local one (personalised evaluation scores it).
    """

    A: str = "shared"
    """The role of ``A: (r, d_in)``."""
    B: str = "shared"
    """The role of ``B: (d_out, r)``."""

    def __post_init__(self) -> None:
        for name in FACTORS:
            role = getattr(self, name)
            if role not in ROLES:
                raise ValueError(f"client protocol: {name} has role {role!r}; valid: {ROLES}")
        if self.B == "frozen":
            raise ValueError("client protocol: only A may be frozen (a frozen B stays zero)")
        if self.A == "local":
            raise ValueError("client protocol: only B may be local (a fresh local A is zero)")
        if not self.trains:
            raise ValueError("client protocol: at least one factor must be trained")

    @property
    def trains(self) -> tuple[str, ...]:
        """The factors local training updates (the others keep their start values)."""
        return tuple(f for f in FACTORS if getattr(self, f) in ("shared", "local"))

    @property
    def sends(self) -> tuple[str, ...]:
        """The factors a client uploads (and, under DP, clips and the server noises): the
        released part of the global update."""
        return tuple(f for f in FACTORS if getattr(self, f) == "shared")

    @property
    def receives(self) -> tuple[str, ...]:
        """The factors the server sends a client (its start): the shared and the held ones."""
        return tuple(f for f in FACTORS if getattr(self, f) in ("shared", "held"))

    @property
    def keeps(self) -> tuple[str, ...]:
        """The factors a client does not upload (frozen, held or local)."""
        return tuple(f for f in FACTORS if f not in self.sends)

    @property
    def local(self) -> tuple[str, ...]:
        """The factors each client keeps as its own across rounds (never sent, never seen by
        the server)."""
        return tuple(f for f in FACTORS if getattr(self, f) == "local")

    @property
    def frozen(self) -> tuple[str, ...]:
        """The factors fixed at the run's seeded shared initialisation (:mod:`.frozen`)."""
        return tuple(f for f in FACTORS if getattr(self, f) == "frozen")

    @property
    def held(self) -> tuple[str, ...]:
        """The factors held this round at the server's current global factor."""
        return tuple(f for f in FACTORS if getattr(self, f) == "held")

    @property
    def fixed(self) -> tuple[str, ...]:
        """The factors the aggregation holds as they are (frozen or held), never sums: every
        client's is a prefix of the same matrix."""
        return tuple(f for f in FACTORS if getattr(self, f) in ("frozen", "held"))

    @property
    def cycle(self) -> tuple[ClientProtocol, ...]:
        """Every round's protocol: this one alone."""
        return (self,)

    @property
    def has_global_model(self) -> bool:
        """False when a factor stays on the clients: the server's aggregate is not a model
        anyone holds (each client's is the shared factors with its own local one)."""
        return not self.local

    def at(self, round_: int) -> ClientProtocol:
        """The protocol of round ``round_`` (1-based): this one, whatever the round."""
        return self


@dataclass(frozen=True)
class ProtocolCycle:
    """A client protocol that changes with the round: round ``t`` (1-based) follows
    ``rounds[(t - 1) % len(rounds)]``. Read through :meth:`at` only (:class:`ClientProtocol`
    has the same method), so whoever reads a method's protocol reads it for a round.

    The first round cannot hold B: no global B exists yet and a fresh B is zero, which would
    keep the first round's update at zero."""

    rounds: tuple[ClientProtocol, ...]
    """The protocols of one cycle of rounds, in order."""

    def __post_init__(self) -> None:
        if not self.rounds or not all(isinstance(p, ClientProtocol) for p in self.rounds):
            raise ValueError("protocol cycle: give one ClientProtocol per round of the cycle")
        if "B" in self.rounds[0].held:
            raise ValueError("protocol cycle: round 1 cannot hold B (no global B exists yet)")
        if any(p.local for p in self.rounds):
            raise ValueError("protocol cycle: a local factor is the client's in every round")

    @property
    def cycle(self) -> tuple[ClientProtocol, ...]:
        """Every round's protocol, in order."""
        return self.rounds

    @property
    def has_global_model(self) -> bool:
        """True: a cycle holds no local factor (checked when it is built)."""
        return True

    def at(self, round_: int) -> ClientProtocol:
        """The protocol of round ``round_`` (1-based)."""
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
            raise ValueError(f"protocol cycle: round {round_!r} must be an integer >= 1")
        return self.rounds[(round_ - 1) % len(self.rounds)]


class HeldSource(Protocol):
    """Where the aggregation takes a round's fixed factors from (frozen or held): the run's
    frozen initialisation (:class:`.frozen.FrozenInit`, A only) or the server's start basis
    (:class:`.starts.StartBasis`, the current global factors)."""

    def factor(self, name: str, module: str, count: int, size: int) -> Tensor:
        """``module``'s factor ``name``, first ``count`` components: ``A: (count, size)`` or,
        scale folded in, ``B: (size, count)``."""
        ...


DEFAULT_PROTOCOL = ClientProtocol()
"""Train and send both factors: every method of the seed."""


FORMS = ("stack", "padded")
"""How a method assembles weighted components into the global factors (:meth:`Method.combine`):

- ``stack``: ``dW = sum_k Bh_k diag(gamma_k) A_k``, held as the stack of every client's weighted
  components (:func:`.linalg.weighted_stack`, width ``S = sum r_k``): a weighted sum of
  per-client updates (RB-LoRA, FLoRA, FlexLoRA);
- ``padded``: ``B_g = sum_k pad(Bh_k) diag(gamma_k)``, ``A_g = sum_k diag(gamma_k) pad(A_k)``,
  ``dW = B_g @ A_g`` (:func:`.linalg.padded_component_sum`, width ``R``): a weighted sum of
  per-client *factors*, whose product is the update (HETLoRA, FedIT, RB-LoRA (factor))."""


@dataclass(frozen=True)
class Method:
    """An aggregation method: how client factors combine, and how the result is redistributed.

    The aggregation rule for one module is :meth:`combine`: the component weights
    (:attr:`weights`) assembled in the method's :attr:`form`."""

    name: str
    """Canonical name (the seed's CLI name), e.g. ``"RB-LoRA"``."""
    weights: Weights
    """The component weights (see :data:`Weights`)."""
    form: str
    """``"stack"`` or ``"padded"`` (see :data:`FORMS`)."""
    default_reduction: str
    """Redistribution used when none is asked for."""
    reductions: tuple[str, ...]
    """Redistribution rules this method accepts."""
    exact_mean: bool
    """True if equal ranks and equal ``num_examples`` give exactly the mean of the ``dW_k``."""
    ordered_components: bool
    """True if component j of the global factors has one meaning for every client (padded
    HETLoRA-style factors), so ``truncate`` does not depend on client order; False for stacks."""
    aliases: tuple[str, ...] = ()
    """Extra accepted names (matching ignores case, spaces and punctuation anyway)."""
    homogeneous_ranks: bool = False
    """True if every client must have the same rank (FedIT); checked before any training."""
    share: Share | None = None
    """The weights as per-client raw weights and denominator masses (:data:`Share`), so a round
    can be aggregated as its updates arrive (:class:`.streaming.RoundSum`); None: the method is
    aggregated from the round's whole list (its weights need every client at once)."""
    protocol: ClientProtocol | ProtocolCycle = DEFAULT_PROTOCOL
    """Which factors a client trains, sends and keeps (:class:`ClientProtocol`), or a cycle of
    them when that changes with the round (:class:`ProtocolCycle`; read it with
    ``protocol.at(round_)``). A frozen or held factor is held by the aggregation as it is
    (every client's is a prefix of the same matrix), never summed: ``padded`` form only."""
    reduction_note: str = ""
    """Why the redistributions left out of :attr:`reductions` are not defined for this method
    (said when one is asked for)."""
    residual: bool = False
    """True if the method also folds its residual into the frozen base weights (FedEx-LoRA):
    the weighted sum of the clients' updates, ``sum_k Bh_k diag(gamma_k) A_k`` (the ``stack``
    form of the same weights), minus the product of the global factors ``B_g @ A_g``, so that
    the global model is the exact weighted sum while clients start from the factors (``padded``
    form only; :attr:`.global_update.GlobalUpdate.folds_residual`)."""

    update_weights: UpdateWeights | None = None
    """Client weights that depend on the clients' updates themselves, not only on their ranks
    and sizes (HETLoRA's sparsity weights ``||dW_k||_F / sum_k' ||dW_k'||_F``): given, it
    replaces :attr:`weights` in :meth:`combine`, module by module, and the method must have no
    ``share`` (its weights need every client of the round at once)."""
    local_rank_pruning: bool = False
    """True if the method's clients may prune their own rank in local training (HETLoRA's rank
    self-pruning, :mod:`rblora.training.rank_pruning`): a reply may then hold a smaller rank
    than the client's, never a larger one, which the server accepts for this method only
    (:attr:`rblora.protocol.factors.FactorPlan.prunes`)."""
    dp_note: str = ""
    """Non-empty: client-level DP is not defined for this method, and this says why (the one
    line a DP run of it is refused with, :func:`.privacy.check_private`)."""

    def combine(
        self, As: Sequence[Tensor], Bhs: Sequence[Tensor], num_examples: Sequence[int]
    ) -> FactorPair:
        """The global factors ``(A_g: (k, d_in), B_g: (d_out, k))`` of one module, where client
        k gives ``A_k: (r_k, d_in)`` and ``Bh_k = s_k * B_k: (d_out, r_k)``; the global update is
        ``B_g @ A_g``. Inputs are never modified; the result holds new tensors."""
        if self.update_weights is not None:
            per_client = self.update_weights(As, Bhs)  # (K,) float64
            width = max(a.shape[0] for a in As)
            has = torch.stack([torch.arange(width) < a.shape[0] for a in As]).double()
            return assemble(self.form, As, Bhs, per_client[:, None] * has)
        gamma = self.weights([a.shape[0] for a in As], num_examples)
        if "B" in self.protocol.at(1).local:  # each client's own: the server aggregates zeros
            Bhs = [torch.zeros_like(b) for b in Bhs]
        return assemble(self.form, As, Bhs, gamma, hold_a="A" in self.protocol.at(1).fixed)


def assemble(
    form: str, As: Sequence[Tensor], Bhs: Sequence[Tensor], gamma: Tensor, hold_a: bool = False
) -> FactorPair:
    """Weighted components in ``form`` (see :data:`FORMS`); ``gamma: (K, >= max r_k)``.
    ``hold_a``: A is frozen (the same matrix for every client), held, not summed (``padded``)."""
    if form == "stack":
        return weighted_stack(As, Bhs, gamma)
    if form == "padded":
        a_g, b_g = padded_component_sum(As, Bhs, gamma)
        if hold_a:
            a_g = held_rows(As, a_g.shape[0])
        return a_g, b_g
    raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
