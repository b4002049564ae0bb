"""The server's side of a round, independent of transport and of the task.

:class:`FederatedServer` selects clients, tells each one what it starts from, aggregates their
updates through :mod:`rblora.aggregation` and redistributes the global update to every client's
own rank. The in-process loop and the Flower server use the same object; it holds no model and
does no I/O. Its whole state is tensors and integers (:meth:`state_tensors`, restored exactly by
:meth:`load_state_tensors`), all on the CPU.

What the global model is after round t (the delta from the ORIGINAL base weights ``W0``):

- redistribution ``svd`` / ``truncate``: ``W0 + dW_t``; clients start from rank-r projections,
  every one a prefix of one :class:`~rblora.aggregation.starts.StartBasis` as wide as the largest
  rank, which is all the server keeps of them (:meth:`FederatedServer.deliver` cuts each start);
- ``merge`` (FLoRA): ``W0 + D_t`` with ``D_t = dW_1 + ... + dW_t`` (:class:`UpdateSum`, whose size
  is bounded by one dense matrix per module); clients start from a fresh LoRA on that base.

Dense extra parameters (a classification head) are replaced by their example-weighted mean every
round, whatever the redistribution, and every client starts from that mean.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import torch

from rblora.aggregation import ClientUpdate, GlobalUpdate, aggregate
from rblora.aggregation.privacy import ClientDP, ClipReport, private_aggregate
from rblora.aggregation.running import ModuleDelta, UpdateSum, delta_shape
from rblora.aggregation.starts import StartBasis
from rblora.aggregation.types import Factors
from rblora.federation.options import selection_count
from rblora.federation.privacy import PrivacySettings
from rblora.protocol.codec import (
    decode_basis,
    decode_deltas,
    decode_dense,
    decode_factors,
    encode,
    encode_basis,
)
from rblora.protocol.types import ClientSpec, ClientStart, tensor_bytes

BYTES_PER_VALUE = 4  # float32, as the server keeps and sends every tensor
DP_NOISE_STREAM = 0xD9  # derive_seed(seed, round, DP_NOISE_STREAM) seeds a round's DP noise


@dataclass
class GlobalModel:
    """The global model after a round, as a delta from the original base weights.

    ``delta``: module -> ``(A, B)`` (scale folded in) or a dense ``(d_out, d_in)``;
    ``merged``: True if ``delta`` lives in the base weights (merge protocol), False if it is
    applied on top of the unchanged base; ``dense``: the averaged dense extra parameters.
    """

    delta: dict[str, ModuleDelta]
    merged: bool
    dense: dict[str, torch.Tensor]


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
        privacy: client-level DP (every round aggregates with
            :func:`rblora.aggregation.privacy.private_aggregate`, its noise seeded by
            ``derive_seed(seed, t, DP_NOISE_STREAM)``); None: off. Needs every client's
            ``num_examples`` (the weights' fixed denominator).
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
        privacy: PrivacySettings | None = None,
    ):
        if [c.client_id for c in clients] != list(range(len(clients))):
            raise ValueError("clients must be given in order with ids 0..K-1")
        self.privacy = privacy
        self._dp: ClientDP | None = None
        if privacy is not None:
            unknown = [c.client_id for c in clients if c.num_examples is None]
            if unknown:
                raise ValueError(
                    f"client-level DP fixes every client's weight before the run, but the "
                    f"example counts of clients {unknown} are unknown (give their partition.json "
                    "or --client_dataset_size_dict)"
                )
            self._dp = ClientDP(
                clip=privacy.clip,
                noise_multiplier=privacy.noise_multiplier,
                sample_rate=privacy.sample_rate,
                ranks=tuple(c.rank for c in clients),
                num_examples=tuple(int(c.num_examples) for c in clients),
            )
        self.last_clip: ClipReport | None = None  # what DP clipping did in the last aggregation
        self.method = method
        self.reduction = reduction
        self.clients = clients
        self.selection = selection
        self.frac = frac
        self.seed = seed
        self.completed_rounds = 0
        self._basis: StartBasis | None = None  # every client's start is cut from it (svd, truncate)
        self._old_starts: dict[int, Factors] = {}  # per-client starts of an older checkpoint
        self.base_total = UpdateSum()  # merged global updates (merge protocol)
        self.dense: dict[str, torch.Tensor] = {}  # averaged dense extras of the last round
        self._merge_widths: list[int] = []  # width of each round's merged update (0: none)
        self._synced: dict[int, int] = {}  # client -> rounds whose merges it has received

    # ------------------------------------------------------------------ a round
    def select(self, round_: int) -> list[int]:
        """Clients that train in round ``round_`` (1-based), sorted."""
        k = len(self.clients)
        if self.selection == "all":
            return list(range(k))
        n = selection_count(k, self.frac)
        rng = np.random.default_rng(derive_seed(self.seed, round_))
        return sorted(int(i) for i in rng.choice(k, size=n, replace=False))

    def deliver(self, client_id: int) -> ClientStart:
        """What ``client_id`` starts this round from; records that it now has the current state.

        ``download_bytes`` counts float32 values: the client's rank-r adapter (svd / truncate),
        the averaged dense extras, and under the merge protocol every merged update the client
        has not received yet (all of them since it last trained, not only the last one), per
        module at most one dense matrix (a client far behind is sent the dense difference).
        """
        start = ClientStart(
            factors=self._start_of(client_id),
            dense=dict(self.dense),
            base_delta=self.base_total.as_dict(),
        )
        total = tensor_bytes(self.dense.values())
        if start.factors:
            total += tensor_bytes(t for pair in start.factors.values() for t in pair)
        missed = sum(self._merge_widths[self._synced.get(client_id, 0) :])
        if missed:
            for delta in start.base_delta.values():
                d_out, d_in = delta_shape(delta)
                total += min(missed * (d_in + d_out), d_in * d_out) * BYTES_PER_VALUE
        start.download_bytes = total
        self._synced[client_id] = self.completed_rounds
        return start

    def aggregate(self, updates: list[ClientUpdate]) -> GlobalUpdate:
        """Aggregate this round's client updates (order does not matter); under client-level DP
        clipped, with fixed weights and seeded noise (round ``completed_rounds + 1``)."""
        if self._dp is None:
            return aggregate(self.method, updates, reduction=self.reduction)
        seed = derive_seed(self.seed, self.completed_rounds + 1, DP_NOISE_STREAM)
        global_update, self.last_clip = private_aggregate(
            self.method, updates, self._dp, seed=seed, reduction=self.reduction
        )
        return global_update

    def privacy_record(self) -> dict:
        """Under DP, the round record's privacy fields after the round just closed: epsilon spent
        so far at the run's delta (None with no noise: no guarantee), and how many clients were
        clipped; ``{}`` otherwise."""
        if self.privacy is None:
            return {}
        record = {"dp_epsilon": self.privacy.epsilon(self.completed_rounds)}
        if self.last_clip is not None:
            record["dp_clipped"] = self.last_clip.clipped
            record["dp_norm_median"] = statistics.median(self.last_clip.norms)
        return record

    def redistribute(self, global_update: GlobalUpdate) -> GlobalModel:
        """Close the round: compute every client's start for the next one; return the global model.

        Under the merge protocol the global update is added to :attr:`base_total` and every client
        restarts from a fresh LoRA; otherwise each client gets its rank-r projection.
        """
        self.dense = {n: t.to(torch.float32) for n, t in global_update.dense.items()}
        update = {m: global_update.module_delta(m) for m in global_update.modules}
        if global_update.merges_into_base:
            self.base_total.add(update)
            self._merge_widths.append(max(global_update.rank(m) for m in update))
            model = GlobalModel(self.base_total.as_dict(), merged=True, dense=dict(self.dense))
        else:
            self._merge_widths.append(0)
            model = GlobalModel(update, merged=False, dense=dict(self.dense))
        # None under merge; else as wide as the largest client (also those not selected)
        self._basis = global_update.start_basis(max(c.rank for c in self.clients))
        self._old_starts = {}
        self.completed_rounds += 1
        return model

    def _start_of(self, client_id: int) -> Factors | None:
        """The adapter ``client_id`` starts its next round from (None: a fresh LoRA), cut from
        the start basis by the same function on every round and after a resume."""
        if client_id in self._old_starts:
            return self._old_starts[client_id]
        if self._basis is None:
            return None
        c = self.clients[client_id]
        return self._basis.for_client(c.rank, c.lora_alpha, c.use_rslora)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) that :meth:`load_state_tensors` restores exactly.

        The clients' starts are stored as their start basis, once (``start_basis``: ``W``
        components per module, ``W`` the largest rank, instead of ``sum_k r_k``)."""
        tensors = encode("server", dense=self.dense, deltas=self.base_total.as_dict())
        meta = {
            "completed_rounds": self.completed_rounds,
            "merge_widths": list(self._merge_widths),
            "synced": {str(k): v for k, v in sorted(self._synced.items())},
            "start_basis": None,
        }
        if self._basis is not None:
            basis_tensors, meta["start_basis"] = encode_basis("start_basis", self._basis)
            tensors.update(basis_tensors)
        if self._old_starts:  # loaded from an older checkpoint, no round since: kept as it was
            for cid, factors in self._old_starts.items():
                tensors.update(encode(f"start/{cid}", factors=factors))
            meta["starts"] = sorted(self._old_starts)
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what :meth:`state_tensors` returned; ValueError if it is inconsistent.

        Also reads a checkpoint written before the start basis (one start adapter per client
        under ``start/<client>``, listed in ``meta["starts"]``): those starts are kept as they
        are until the next round, so such a run also resumes bitwise."""
        completed = int(meta["completed_rounds"])
        widths = [int(w) for w in meta.get("merge_widths", [])]
        if len(widths) != completed:
            raise ValueError(
                f"server state: {len(widths)} merge widths for {completed} completed rounds"
            )
        basis = None
        if meta.get("start_basis") is not None:
            basis = decode_basis(tensors, "start_basis", meta["start_basis"])
            widest = max(c.rank for c in self.clients)
            if basis.width < widest:
                raise ValueError(
                    f"server state: start basis of width {basis.width}, client ranks up to {widest}"
                )
        old_starts = {}
        for cid in meta.get("starts", []):
            if not 0 <= int(cid) < len(self.clients):
                raise ValueError(f"server state: a start for unknown client {cid}")
            old_starts[int(cid)] = decode_factors(tensors, f"start/{cid}")
        self._basis, self._old_starts = basis, old_starts
        self.base_total = UpdateSum.from_dict(decode_deltas(tensors, "server"))
        self.dense = decode_dense(tensors, "server")
        self._merge_widths = widths
        self._synced = {int(k): int(v) for k, v in meta.get("synced", {}).items()}
        self.completed_rounds = completed
