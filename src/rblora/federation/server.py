"""The server's side of a round, independent of transport and of the task.

:class:`FederatedServer` selects clients, tells each one what adapter it starts from, aggregates
their updates through :mod:`rblora.aggregation` and redistributes the global update to every
client's own rank. The in-process loop (:mod:`rblora.federation.loop`) and a networked driver use
the same object; it holds no model and does no I/O. Its whole state is tensors and integers, so it
is checkpointed with :meth:`state_tensors` / :meth:`load_state_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rblora.adapters.spec import Factors, factor_bytes
from rblora.aggregation import ClientUpdate, GlobalUpdate, aggregate


@dataclass(frozen=True)
class ClientSpec:
    """What the server knows of a client: its LoRA rank and scaling."""

    client_id: int
    rank: int
    lora_alpha: float
    use_rslora: bool = False


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for one (round, client, ...) from the run seed; stable across runs."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


class FederatedServer:
    """Client selection, aggregation and redistribution for one run.

    Args:
        method: aggregation method name (see ``rblora.aggregation.available_methods()``).
        clients: one :class:`ClientSpec` per client, ids 0..K-1 in order.
        reduction: redistribution rule (svd | truncate | merge); None = the method's default.
        selection: "random" (``frac`` of the clients, seeded per round) or "all".
        frac: fraction of clients selected per round, in (0, 1].
        seed: run seed; round ``t`` selects with ``derive_seed(seed, t)``.
    """

    def __init__(
        self,
        method: str,
        clients: list[ClientSpec],
        *,
        reduction: str | None = None,
        selection: str = "random",
        frac: float = 1.0,
        seed: int = 0,
    ):
        if [c.client_id for c in clients] != list(range(len(clients))):
            raise ValueError("clients must be given in order with ids 0..K-1")
        self.method = method
        self.reduction = reduction
        self.clients = clients
        self.selection = selection
        self.frac = frac
        self.seed = seed
        self.completed_rounds = 0
        self._starts: dict[int, Factors] = {}  # client -> adapter it starts its next round from
        self.merged: list[Factors] = []  # global updates folded into the base (merge protocol)
        self._broadcast: Factors | None = None  # last merged update, downloaded by every client

    # ------------------------------------------------------------------ a round
    def select(self, round_: int) -> list[int]:
        """Clients that train in round ``round_`` (1-based), sorted."""
        k = len(self.clients)
        if self.selection == "all":
            return list(range(k))
        n = max(int(self.frac * k), 1)
        rng = np.random.default_rng(derive_seed(self.seed, round_))
        return sorted(int(i) for i in rng.choice(k, size=n, replace=False))

    def start_for(self, client_id: int) -> Factors | None:
        """The adapter the client starts from (None: a fresh LoRA, as in round 1)."""
        return self._starts.get(client_id)

    def download_bytes(self, client_id: int) -> int:
        """Bytes the client downloads before training this round."""
        start = self._starts.get(client_id)
        total = factor_bytes(start) if start else 0
        if self._broadcast is not None:
            total += factor_bytes(self._broadcast)
        return total

    def aggregate(self, updates: list[ClientUpdate]) -> GlobalUpdate:
        """Aggregate this round's client updates (order does not matter)."""
        return aggregate(self.method, updates, reduction=self.reduction)

    def redistribute(self, global_update: GlobalUpdate) -> None:
        """Compute every client's start for the next round and close the round.

        Under the merge protocol the global update is recorded in :attr:`merged` (the driver folds
        it into its base weights) and every client restarts from a fresh LoRA.
        """
        self._broadcast = None
        if global_update.merges_into_base:
            merged = {m: global_update.factors(m) for m in global_update.modules}
            self.merged.append(merged)
            self._broadcast = merged
            self._starts = {}
        else:
            self._starts = {
                c.client_id: global_update.for_client(
                    rank=c.rank, lora_alpha=c.lora_alpha, use_rslora=c.use_rslora
                )
                for c in self.clients
            }
        self.completed_rounds += 1

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) that :meth:`load_state_tensors` restores exactly."""
        tensors: dict[str, torch.Tensor] = {}
        for cid, factors in self._starts.items():
            for module, (a, b) in factors.items():
                tensors[f"start/{cid}/{module}/A"] = a.contiguous()
                tensors[f"start/{cid}/{module}/B"] = b.contiguous()
        for i, factors in enumerate(self.merged):
            for module, (a, b) in factors.items():
                tensors[f"merged/{i}/{module}/A"] = a.contiguous()
                tensors[f"merged/{i}/{module}/B"] = b.contiguous()
        meta = {
            "completed_rounds": self.completed_rounds,
            "num_merged": len(self.merged),
            "broadcast": self._broadcast is not None,
        }
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        starts: dict[int, Factors] = {}
        merged: list[Factors] = [{} for _ in range(int(meta["num_merged"]))]
        parts: dict[tuple, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            kind, idx, rest = key.split("/", 2)
            module, which = rest.rsplit("/", 1)
            parts.setdefault((kind, int(idx), module), {})[which] = value
        for (kind, idx, module), ab in parts.items():
            target = starts.setdefault(idx, {}) if kind == "start" else merged[idx]
            target[module] = (ab["A"], ab["B"])
        self._starts = starts
        self.merged = merged
        self._broadcast = merged[-1] if meta.get("broadcast") and merged else None
        self.completed_rounds = int(meta["completed_rounds"])
