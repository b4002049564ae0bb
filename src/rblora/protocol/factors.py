"""A method's client protocol applied to one run: what a client trains, what travels, what stays.

A method declares, factor by factor, what its clients do with their LoRA factors
(:class:`rblora.aggregation.types.ClientProtocol`, or a :class:`~rblora.aggregation.types.
ProtocolCycle` of them when that changes with the round); :class:`FactorPlan` is that
declaration with the run's seed, for one round (:meth:`FactorPlan.at`), and is the one place
the round core, both engines and the codec read it:

- a client's start (:meth:`FactorPlan.client_start`): a frozen A is the run's seeded shared
  initialisation (the first r rows, :mod:`rblora.aggregation.frozen`), whatever the server's
  start held; a held factor is the server's (before any global factor exists, a held A is the
  seeded initialisation too); B starts from the server's B (zero in round 1); local training
  updates only :attr:`FactorPlan.trains` (``ClientStart.trains``);
- what travels (:meth:`FactorPlan.travels`, and ``sends``/``receives`` in :mod:`.codec`): up,
  only the factors the protocol sends; down, those and the held ones; only they are counted in
  the bytes;
- what the server aggregates (:meth:`FactorPlan.restore`): a frozen or held factor is the
  server's own, never a client's word; a local factor (FedSA-LoRA's B) is zeros: the server
  never sees it;
- a client's own kept factor (:attr:`FactorPlan.local`): the client passes what it kept from
  the round it last trained to :meth:`FactorPlan.client_start` (its store,
  :mod:`rblora.federation.client_state`, which the server never reads).

With the default protocol (train and send A and B) every step is the identity: a run is bitwise
what it was before protocols existed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from rblora.aggregation import ClientUpdate, get_method
from rblora.aggregation.frozen import FrozenInit
from rblora.aggregation.types import (
    FACTORS,
    ClientProtocol,
    FactorPair,
    Factors,
    ProtocolCycle,
)
from rblora.protocol.types import ClientSpec, ClientStart


@dataclass(frozen=True)
class Fill:
    """What a decoder puts in place of the factors a message does not carry: ``absent`` names
    them, ``make(module, name)`` gives one (a frozen A: the run's draw; a held factor in a
    reply: zeros, which the server replaces by its own copy, :meth:`FactorPlan.restore`)."""

    absent: tuple[str, ...]
    make: Callable[[str, str], torch.Tensor]


class FactorPlan:
    """``protocol`` (a method's) with the run's public ``seed``, as it applies to round
    ``round_`` (1-based; :meth:`at` gives another round's); see the module doc."""

    def __init__(
        self,
        protocol: ClientProtocol | ProtocolCycle,
        seed: int,
        round_: int = 1,
        _rows: dict | None = None,
        prunes: bool = False,
    ) -> None:
        self.prunes = bool(prunes)
        """True if the method's clients may reply at a smaller rank than theirs (its declared
        ``local_rank_pruning``): :meth:`check_rank` allows it."""
        self.declared = protocol
        """The method's declaration (one protocol, or a cycle of them)."""
        self.round = int(round_)
        self.protocol: ClientProtocol = protocol.at(self.round)
        """This round's protocol."""
        self.seed = int(seed)
        seeded = any(p.frozen for p in protocol.cycle) or "A" in protocol.at(1).held
        self.init: FrozenInit | None = FrozenInit(self.seed) if seeded else None
        """The run's frozen initialisation (None when no round freezes a factor or holds one
        before any global factor exists)."""
        self._rows: dict[tuple[str, int], torch.Tensor] = {} if _rows is None else _rows
        # (module, d_in) -> widest frozen A drawn, shared by every round's plan

    @classmethod
    def for_method(cls, method: str, seed: int, round_: int = 1) -> FactorPlan:
        """The plan of registered ``method`` (its declared protocol) for round ``round_`` of a
        run of ``seed``."""
        spec = get_method(method)
        return cls(spec.protocol, seed, round_, prunes=spec.local_rank_pruning)

    def at(self, round_: int) -> FactorPlan:
        """The plan of round ``round_`` of the same run (the same frozen draws)."""
        if int(round_) == self.round:
            return self
        return FactorPlan(self.declared, self.seed, int(round_), self._rows, self.prunes)

    def check_rank(self, rank: int, known: int, who: str) -> None:
        """A reply's rank ``rank`` against the server's ``known`` rank of the client: equal, or,
        for a method whose clients prune their rank, smaller; ValueError naming ``who``."""
        if rank == known or (self.prunes and 1 <= rank < known):
            return
        allowed = f"at most {known} (its rank, pruned or not)" if self.prunes else str(known)
        raise ValueError(f"{who} replied at rank {rank}; the server expects {allowed}")

    @property
    def trains(self) -> tuple[str, ...]:
        return self.protocol.trains

    @property
    def sends(self) -> tuple[str, ...]:
        """The factors a client uploads this round."""
        return self.protocol.sends

    @property
    def receives(self) -> tuple[str, ...]:
        """The factors the server sends a client this round (its start)."""
        return self.protocol.receives

    @property
    def local(self) -> tuple[str, ...]:
        """The factors each client keeps as its own (never sent, never seen by the server)."""
        return self.protocol.local

    @property
    def has_global_model(self) -> bool:
        """False when a factor stays on the clients (:attr:`local`): the server's aggregate is
        then the shared factors alone, not a model anyone holds."""
        return self.declared.has_global_model

    @property
    def is_default(self) -> bool:
        """True when every factor is trained and sent (nothing to do)."""
        return self.protocol.sends == FACTORS and self.protocol.trains == FACTORS

    def frozen_a(self, module: str, rank: int, d_in: int) -> torch.Tensor:
        """``(rank, d_in)`` float32: the first ``rank`` rows of ``module``'s frozen A (a new
        tensor; the widest drawn so far is kept)."""
        if self.init is None:
            raise ValueError("this method's protocol freezes no factor")
        have = self._rows.get((module, d_in))
        if have is None or len(have) < rank:
            have = self._rows[module, d_in] = self.init.rows(module, rank, d_in)
        return have[:rank].clone()

    def filler(
        self, rank: int, shapes: Mapping[str, tuple[int, int]], down: bool = False
    ) -> Fill | None:
        """What a decoder fills in for the factors a message of this round does not carry
        (``down``: a start, else a reply; ``shapes``: module -> ``(d_out, d_in)``); None when
        both travel."""
        carried = self.receives if down else self.sends
        absent = tuple(f for f in FACTORS if f not in carried)
        if not absent:
            return None

        def make(module: str, name: str) -> torch.Tensor:
            d_out, d_in = shapes[module]
            if name in self.protocol.frozen:
                return self.frozen_a(module, rank, d_in)
            return torch.zeros(rank, d_in) if name == "A" else torch.zeros(d_out, rank)

        return Fill(absent, make)

    def client_start(
        self,
        spec: ClientSpec,
        start: ClientStart,
        shapes: Mapping[str, tuple[int, int]],
        local: Mapping[str, torch.Tensor] | None = None,
    ) -> ClientStart:
        """What the client trains from: ``start`` as the server built it, with a frozen A set to
        the run's initialisation, a held A of a fresh start too (``shapes``: module ->
        ``(d_out, d_in)``; B zero where the start is fresh), a local B set to the client's own
        (``local``: module -> its B as the client kept it, None: it has none yet, so B starts
        at zero) and ``trains`` set. ``start`` itself under the default protocol."""
        if self.is_default:
            return start
        if local is not None and not self.local:
            raise ValueError("this method's clients keep no factor of their own")
        fresh = start.factors is None and local is None
        if fresh and not self.protocol.fixed:
            return replace(start, trains=self.trains)  # a fresh LoRA, some factor not trained
        factors: Factors = {}
        for module, (d_out, d_in) in sorted(shapes.items()):
            a, b = self._start_pair(module, spec.rank, d_out, d_in, start.factors)
            if local is not None:
                b = self._own(local, module, (d_out, spec.rank))
            factors[module] = (a, b)
        return replace(start, factors=factors, trains=self.trains)

    @staticmethod
    def _own(local: Mapping[str, torch.Tensor], module: str, shape: tuple[int, int]):
        """The client's kept B of ``module``, checked against its shape (its own file)."""
        b = local.get(module)
        if b is None or tuple(b.shape) != shape:
            got = None if b is None else tuple(b.shape)
            raise ValueError(f"the client's kept B of {module} is {got}, expected {shape}")
        return b

    def _start_pair(self, module, rank, d_out, d_in, given: Factors | None) -> FactorPair:
        b = torch.zeros(d_out, rank) if given is None else given[module][1]
        seeded = "A" in self.protocol.frozen or given is None
        a = self.frozen_a(module, rank, d_in) if seeded else given[module][0]
        return a, b

    def restore(self, update: ClientUpdate, start: Factors | None = None) -> ClientUpdate:
        """The update as the server aggregates it: every frozen factor replaced by the server's
        own draw of the run's initialisation, every held one by the client's ``start`` as the
        server built it (a fresh start: a held A is the seeded initialisation), every local one
        by zeros (the server never sees it; the in-process engine hands the server the
        client's whole update, this is where its local factor is dropped); a client's copy is
        never trusted. ``update`` itself when this round fixes no factor and keeps none local."""
        if self.protocol.local:
            factors = {m: (a, torch.zeros_like(b)) for m, (a, b) in update.factors.items()}
            update = replace(update, factors=factors)
        if not self.protocol.fixed:
            return update
        factors = {}
        for m, (a, b) in update.factors.items():
            if "A" in self.protocol.frozen or ("A" in self.protocol.held and start is None):
                a = self.frozen_a(m, a.shape[0], a.shape[1]).to(a.dtype)
            elif "A" in self.protocol.held:
                a = start[m][0].to(a.dtype)
            if "B" in self.protocol.held:
                if start is None:
                    raise ValueError("a held B needs the client's start (the server's B)")
                b = start[m][1].to(b.dtype)
            factors[m] = (a, b)
        return replace(update, factors=factors)

    def travels(self, factors: Mapping[str, FactorPair], down: bool = False) -> list[torch.Tensor]:
        """The tensors of ``factors`` that travel this round, for counting bytes: up (a reply)
        the sent factors, ``down`` (a start) the received ones."""
        names = self.receives if down else self.sends
        keep = [i for i, name in enumerate(FACTORS) if name in names]
        return [pair[i] for pair in factors.values() for i in keep]


DEFAULT_PLAN = FactorPlan(ClientProtocol(), 0)
"""The plan of the default protocol (train and send A and B): every step is the identity."""
