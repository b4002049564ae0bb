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
  is bounded by one dense matrix per module); clients start from a fresh LoRA on that base;
- a method that folds a residual (FedEx-LoRA): ``W0 + D_t + B_t @ A_t`` with ``D_t`` the sum of
  the rounds' residuals (the same :class:`UpdateSum`, sent to clients as the merged total is)
  and ``(A_t, B_t)`` the factors every client starts from a prefix of.

Dense extra parameters (a classification head) are replaced by their example-weighted mean every
round, whatever the redistribution, and every client starts from that mean.

Under client-level DP the server also holds the run's **noise key**: 256 bits from the operating
system's CSPRNG, drawn when the run starts and kept only in its checkpoint (the server's private
state, file mode 0600), never in ``config.json``, a record or a message. Every round's noise,
the client selection and adaptive clipping's count noise are streams of that key
(:func:`rblora.aggregation.privacy.secret_generator`), so a resumed run draws exactly what the
uninterrupted one would, and nobody without the checkpoint can re-draw them.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, replace

import numpy as np
import torch

from rblora.aggregation import ClientUpdate, GlobalUpdate
from rblora.aggregation.api import open_round
from rblora.aggregation.privacy import (
    ClientDP,
    ClipReport,
    PrivateRoundSum,
    new_noise_key,
    secret_generator,
)
from rblora.aggregation.running import ModuleDelta, UpdateSum, delta_shape
from rblora.aggregation.starts import StartBasis
from rblora.aggregation.types import DEFAULT_SVD_ENERGY, Factors, check_svd_energy
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
from rblora.protocol.factors import FactorPlan
from rblora.protocol.types import ClientSpec, ClientStart, UpdateLayout, tensor_bytes

BYTES_PER_VALUE = 4  # float32, as the server keeps and sends every tensor
# streams of the secret noise key, per round: secret_generator(key, round, STREAM)
NOISE_STREAM, SELECT_STREAM, COUNT_STREAM = 1, 2, 3
SKETCH_STREAM = 0x5C  # derive_seed(seed, round, SKETCH_STREAM): the randomized SVD (public)


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


def _width(delta: ModuleDelta) -> int:
    """Components of a factored delta, ``min(d_out, d_in)`` of a dense one (what a client that
    has not received it downloads, at most: see :meth:`FederatedServer.deliver`)."""
    return min(delta_shape(delta)) if torch.is_tensor(delta) else int(delta[0].shape[0])


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for one (round, client, ...) from the run seed; stable across runs. The run
    seed is public: nothing secret (the DP noise) may come from it."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_key(seed: int) -> bytes:
    """The noise key ``--dp_noise_from_seed`` uses: a hash of the public run seed, so runs
    repeat and anyone who knows the seed can re-draw the noise (no guarantee: tests and
    debugging only)."""
    return hashlib.sha256(f"rblora: DP noise from the public seed {int(seed)}".encode()).digest()


class FederatedServer:
    """Client selection, aggregation and redistribution for one run.

    Args:
        method: aggregation method name (see ``rblora.aggregation.available_methods()``).
        clients: one :class:`ClientSpec` per client, ids 0..K-1 in order.
        reduction: redistribution rule (svd | truncate | merge); None = the method's default.
        selection: "random" (``frac`` of the clients, seeded per round) or "all".
        frac: fraction of clients selected per round, in (0, 1].
        sampling: "fixed" (exactly ``round(frac K)`` clients) or "poisson" (each client
            independently with probability ``frac``; without DP a draw that selects nobody is
            drawn again, under DP an empty round releases the noise alone).
        seed: run seed; without DP round ``t`` selects with ``derive_seed(seed, t)``.
        privacy: client-level DP (every round aggregates with
            :func:`rblora.aggregation.privacy.private_aggregate`; noise and selection come from
            the secret noise key, see the module doc); None: off. Needs every client's
            ``num_examples`` (the weights' fixed denominator).
        layout: the shapes of every client's update (the task's); needed under DP, where an
            empty round releases noise of those shapes.
        svd_energy: the ``threshold`` redistribution's energy (FLoRIST), in (0, 1].
    """

    def __init__(
        self,
        method: str,
        clients: list[ClientSpec],
        *,
        reduction: str | None = None,
        selection: str = "random",
        frac: float = 1.0,
        sampling: str = "fixed",
        seed: int = 0,
        privacy: PrivacySettings | None = None,
        layout: UpdateLayout | None = None,
        svd_energy: float = DEFAULT_SVD_ENERGY,
    ):
        if [c.client_id for c in clients] != list(range(len(clients))):
            raise ValueError("clients must be given in order with ids 0..K-1")
        if sampling not in ("fixed", "poisson"):
            raise ValueError(f"sampling {sampling!r}: valid are fixed, poisson")
        self.privacy = privacy
        self._dp: ClientDP | None = None
        self._key: bytes | None = None  # the secret noise key (DP only; never leaves the server)
        self.clip: float | None = None  # DP: the next round's clip (adaptive clipping moves it)
        if privacy is not None:
            unknown = [c.client_id for c in clients if c.num_examples is None]
            if unknown:
                raise ValueError(
                    f"client-level DP fixes every client's weight before the run, but the "
                    f"example counts of clients {unknown} are unknown (give their partition.json "
                    "or --client_dataset_size_dict)"
                )
            if layout is None:
                raise ValueError("client-level DP needs the update layout (empty rounds' shapes)")
            self._dp = ClientDP(
                clip=privacy.clip,
                noise_multiplier=privacy.update_noise_multiplier,
                sample_rate=privacy.sample_rate,
                ranks=tuple(c.rank for c in clients),
                num_examples=tuple(int(c.num_examples) for c in clients),
            )
            self.clip = privacy.clip
            self._key = seed_key(seed) if privacy.seeded_noise else new_noise_key()
        self.last_clip: ClipReport | None = None  # what DP clipping did in the last aggregation
        self._round = None  # the running sums of the round in progress (fold, aggregate)
        self.layout = layout
        self.svd_energy = check_svd_energy(svd_energy)
        self.plan = FactorPlan.for_method(method, seed)
        """The method's client protocol with the run's seed (what clients train and send)."""
        self.method = method
        self.reduction = reduction
        self.clients = clients
        self.selection = selection
        self.frac = frac
        self.sampling = sampling
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
        """Clients that train in round ``round_`` (1-based), sorted. Under DP drawn from the
        secret key (who takes part is then private; under Poisson sampling it may be nobody),
        else from the run seed."""
        k = len(self.clients)
        if self.selection == "all":
            return list(range(k))
        if self._key is not None:
            rng = secret_generator(self._key, round_, SELECT_STREAM)
        else:
            rng = np.random.default_rng(derive_seed(self.seed, round_))
        if self.sampling == "fixed":
            n = selection_count(k, self.frac)
            return sorted(int(i) for i in rng.choice(k, size=n, replace=False))
        while True:
            chosen = np.flatnonzero(rng.random(k) < self.frac)
            if len(chosen) or self._key is not None:
                return [int(i) for i in chosen]

    def deliver(self, client_id: int) -> ClientStart:
        """What ``client_id`` starts this round from; records that it now has the current state.

        ``download_bytes`` counts float32 values: the client's rank-r adapter (svd / truncate;
        the factors the method's protocol sends, :class:`FactorPlan`),
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
        if start.factors:  # only the factors the method's protocol sends down this round
            total += tensor_bytes(self.round_plan.travels(start.factors, down=True))
        missed = sum(self._merge_widths[self._synced.get(client_id, 0) :])
        if missed:
            for delta in start.base_delta.values():
                d_out, d_in = delta_shape(delta)
                total += min(missed * (d_in + d_out), d_in * d_out) * BYTES_PER_VALUE
        start.download_bytes = total
        self._synced[client_id] = self.completed_rounds
        return start

    def fold(self, update: ClientUpdate) -> ClientUpdate:
        """Fold one reply of the round in progress (round ``completed_rounds + 1``) into its
        running sums as it arrives (:mod:`rblora.aggregation.streaming`; under DP clipped
        first): the server never holds the round's client updates, only sums whose size does
        not grow with them. ValueError naming the client for a reply that does not fit.
        Returns the update as folded: a factor the client did not send (frozen or held) is the
        server's own (:meth:`FactorPlan.restore`), so it is the client's whole adapter."""
        if self._round is None:
            self._round = self._open_round()
        plan = self.round_plan
        start = self._start_of(update.client_id) if plan.protocol.held else None
        update = plan.restore(update, start)  # a frozen or held factor: the server's
        self._round.add(update)
        return update

    def aggregate(self, updates: list[ClientUpdate] | None = None) -> GlobalUpdate:
        """The round's global update from what :meth:`fold` took (or from ``updates``, folded
        now; order does not matter); under client-level DP clipped, with fixed weights and the
        secret key's noise (an empty round releases the noise alone), then the clip of the next
        round moved by adaptive clipping."""
        if updates is not None:
            self._round = None
            for update in updates:
                self.fold(update)
        total = self._round if self._round is not None else self._open_round()
        self._round = None
        if self._dp is None:
            return total.finish()
        round_ = self.completed_rounds + 1
        noise = secret_generator(self._key, round_, NOISE_STREAM) if total.dp.noise_std else None
        global_update, self.last_clip = total.finish(
            noise, sketch_seed=derive_seed(self.seed, round_, SKETCH_STREAM)
        )
        adaptive = self.privacy.adaptive
        if adaptive is not None:
            draw = float(secret_generator(self._key, round_, COUNT_STREAM).standard_normal())
            self.clip = adaptive.next_clip(self.clip, self.last_clip.unclipped, draw)
        return global_update

    @property
    def round_plan(self) -> FactorPlan:
        """The client protocol of the round in progress (``completed_rounds + 1``)."""
        return self.plan.at(self.completed_rounds + 1)

    def _held_source(self):
        """Where the round in progress takes its fixed factors from: the current global
        factors (the start basis) for a held factor once they exist, else the run's frozen
        initialisation (None when the method's protocol fixes no factor)."""
        if self.round_plan.protocol.held and self._basis is not None:
            return self._basis
        return self.plan.init

    def _open_round(self):
        """The running sums of a new round: private (the clip of this round), or the method's."""
        round_, held = self.completed_rounds + 1, self._held_source()
        if self._dp is not None:
            return PrivateRoundSum(
                self.method, replace(self._dp, clip=self.clip), reduction=self.reduction,
                shapes=self.layout.modules, dense_shapes=self.layout.dense, held=held,
                svd_energy=self.svd_energy, round_=round_,
            )  # fmt: skip
        return open_round(
            self.method, self.reduction, ranks=[c.rank for c in self.clients],
            held=held, svd_energy=self.svd_energy, round_=round_,
        )  # fmt: skip

    def privacy_record(self) -> tuple[dict, dict]:
        """Under DP, the round record's privacy fields after the round just closed, as
        ``(released, private)``: what may be released (the epsilon spent so far at the run's
        delta, None without a guarantee; with adaptive clipping the clip the round used, itself
        DP) and what stays in the server's private state (how many clients were clipped, the
        median of their term norms before clipping, the count adaptive clipping followed);
        ``({}, {})`` otherwise."""
        if self.privacy is None:
            return {}, {}
        released: dict = {"dp_epsilon": self.privacy.epsilon(self.completed_rounds)}
        private: dict = {}
        report = self.last_clip
        if report is not None:
            if self.privacy.adaptive is not None:
                released["dp_clip"] = report.clip
            private["dp_clipped"] = report.clipped
            private["dp_unclipped"] = report.unclipped
            private["dp_norm_median"] = statistics.median(report.norms) if report.norms else None
        return released, private

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
        elif global_update.folds_residual:  # FedEx-LoRA: the residual into the base, the
            residual = {m: global_update.residual(m) for m in update}  # factors to clients
            self.base_total.add(residual)
            self._merge_widths.append(max(_width(d) for d in residual.values()))
            whole = UpdateSum.from_dict(self.base_total.as_dict())
            whole.add(update)  # the global model: the base's total and the factors' product
            model = GlobalModel(whole.as_dict(), merged=True, dense=dict(self.dense))
        else:
            self._merge_widths.append(0)
            model = GlobalModel(update, merged=False, dense=dict(self.dense))
        # None under merge; else as wide as the largest client (also those not selected)
        self._basis = global_update.start_basis(max(c.rank for c in self.clients))
        self._old_starts = {}
        self.completed_rounds += 1
        return model

    def start_of(self, client_id: int) -> Factors | None:
        """What ``client_id`` holds after the last round: the adapter it starts its next round
        from (None: a fresh LoRA), as :meth:`deliver` would hand it, without recording a
        delivery (the personalised evaluation reads it)."""
        return self._start_of(client_id)

    def participants(self) -> list[int]:
        """The clients handed a start at least once (every client that has trained), sorted;
        kept in the checkpoint."""
        return sorted(self._synced)

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
        if self._key is not None:  # private: the checkpoint is written with mode 0600
            meta["dp"] = {"noise_key": self._key.hex(), "clip": self.clip}
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
        if self._dp is not None:
            dp = meta.get("dp")
            if not isinstance(dp, dict) or not isinstance(dp.get("noise_key"), str):
                raise ValueError(
                    "server state: no DP noise key (a run started by an older rblora, whose "
                    "noise came from the public seed); start the run again"
                )
            self._key = bytes.fromhex(dp["noise_key"])
            self.clip = float(dp["clip"])
        self.completed_rounds = completed
