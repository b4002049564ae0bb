"""A method's client protocol applied to one run: what a client trains, what travels, what stays.

A method declares, factor by factor, what its clients do with their LoRA factors
(:class:`rblora.aggregation.types.ClientProtocol`); :class:`FactorPlan` is that declaration
with the run's seed, and is the one place the round core, both engines and the codec read it:

- a client's start (:meth:`FactorPlan.client_start`): a frozen A is the run's seeded shared
  initialisation (the first r rows, :mod:`rblora.aggregation.frozen`), whatever the server's
  start held, and B starts from the server's B (zero in round 1); local training updates only
  :attr:`FactorPlan.trains` (``ClientStart.trains``);
- what travels (:meth:`FactorPlan.travels`, and ``sends`` in :mod:`.codec`): only the factors
  the protocol sends, up and down, and only they are counted in the bytes;
- what the server aggregates (:meth:`FactorPlan.restore`): a frozen factor is the server's own
  draw, never a client's word.

With the default protocol (train and send A and B) every step is the identity: a run is bitwise
what it was before protocols existed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from rblora.aggregation import ClientUpdate, get_method
from rblora.aggregation.frozen import FrozenInit
from rblora.aggregation.types import FACTORS, ClientProtocol, FactorPair, Factors
from rblora.protocol.types import ClientSpec, ClientStart


class FactorPlan:
    """``protocol`` (a method's) with the run's public ``seed``; see the module doc."""

    def __init__(self, protocol: ClientProtocol, seed: int) -> None:
        self.protocol = protocol
        self.init: FrozenInit | None = FrozenInit(int(seed)) if protocol.frozen else None
        """The run's frozen initialisation (None when no factor is frozen)."""
        self._rows: dict[tuple[str, int], torch.Tensor] = {}  # (module, d_in) -> widest drawn

    @classmethod
    def for_method(cls, method: str, seed: int) -> FactorPlan:
        """The plan of registered ``method`` (its declared protocol) for a run of ``seed``."""
        return cls(get_method(method).protocol, seed)

    @property
    def trains(self) -> tuple[str, ...]:
        return self.protocol.trains

    @property
    def sends(self) -> tuple[str, ...]:
        return self.protocol.sends

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
        self, rank: int, shapes: Mapping[str, tuple[int, int]]
    ) -> Callable[[str], torch.Tensor] | None:
        """``fill(module) -> A: (rank, d_in)`` for a decoder of a message that does not carry
        A (a frozen A; ``shapes``: module -> ``(d_out, d_in)``); None when A travels."""
        if "A" in self.sends:
            return None
        return lambda module: self.frozen_a(module, rank, shapes[module][1])

    def client_start(
        self, spec: ClientSpec, start: ClientStart, shapes: Mapping[str, tuple[int, int]]
    ) -> ClientStart:
        """What the client trains from: ``start`` as the server built it, with a frozen A set to
        the run's initialisation (``shapes``: module -> ``(d_out, d_in)``; B zero where the
        start is fresh) and ``trains`` set. ``start`` itself under the default protocol."""
        if self.is_default:
            return start
        factors: Factors = {}
        for module, (d_out, d_in) in sorted(shapes.items()):
            a, b = self._start_pair(module, spec.rank, d_out, d_in, start.factors)
            factors[module] = (a, b)
        return replace(start, factors=factors, trains=self.trains)

    def _start_pair(self, module, rank, d_out, d_in, given: Factors | None) -> FactorPair:
        b = torch.zeros(d_out, rank) if given is None else given[module][1]
        a = self.frozen_a(module, rank, d_in) if "A" in self.protocol.frozen else given[module][0]
        return a, b

    def restore(self, update: ClientUpdate) -> ClientUpdate:
        """The update as the server aggregates it: every frozen factor replaced by the server's
        own draw of the run's initialisation (a client's copy is never trusted); ``update``
        itself under the default protocol."""
        if not self.protocol.frozen:
            return update
        factors = {
            m: (self.frozen_a(m, a.shape[0], a.shape[1]).to(a.dtype), b)
            for m, (a, b) in update.factors.items()
        }
        return replace(update, factors=factors)

    def travels(self, factors: Mapping[str, FactorPair]) -> list[torch.Tensor]:
        """The tensors of ``factors`` that travel (the sent factors), for counting bytes."""
        keep = [i for i, name in enumerate(FACTORS) if name in self.sends]
        return [pair[i] for pair in factors.values() for i in keep]


DEFAULT_PLAN = FactorPlan(ClientProtocol(), 0)
"""The plan of the default protocol (train and send A and B): every step is the identity."""
