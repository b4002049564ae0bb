"""``aggregate``: client updates in, a :class:`~.global_update.GlobalUpdate` out."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .global_update import GlobalUpdate
from .registry import get_method, resolve_reduction
from .streaming import RoundSum
from .types import DEFAULT_SVD_ENERGY, ClientUpdate, FactorPair, HeldSource, check_svd_energy
from .validation import validate_updates


@torch.no_grad()
def aggregate(
    method: str,
    updates: Sequence[ClientUpdate],
    reduction: str | None = None,
    *,
    svd_energy: float = DEFAULT_SVD_ENERGY,
    round_: int = 1,
    held: HeldSource | None = None,
) -> GlobalUpdate:
    """Aggregate the clients' LoRA adapters with ``method``.

    Args:
        method: a registered name (see ``available_methods()``; case and punctuation ignored).
        updates: one :class:`ClientUpdate` per client, all with the same module names and shapes;
            ranks and ``lora_alpha`` may differ. Never modified.
        reduction: redistribution rule, ``None`` for the method's default, or ``"svd"``,
            ``"truncate"``, ``"merge"``, ``"threshold"`` where the method allows it.
        svd_energy: under ``"threshold"`` (FLoRIST), the fraction of each module's energy a
            client's start keeps, in (0, 1].
        round_: the round (1-based) of the updates, for a method whose client protocol
            changes with the round (RoLoRA: odd rounds average B, even rounds A).
        held: the source of the factors the round holds fixed (:data:`.types.HeldSource`);
            None: the widest client's copy (each client's must be its prefix).

    Returns:
        The global update. Work happens in float32 (float64 if any input is float64); returned
        tensors take the promoted dtype of the inputs. A method with a ``share`` is aggregated
        by the running sums of :class:`.streaming.RoundSum` (what a streamed round does); one
        without, from the whole list by its ``weights``.

    Raises:
        ValueError: unknown method or reduction, or bad updates (see ``validate_updates``).

    Runs without autograd, so factors may be live ``nn.Parameter`` objects; the result holds
    only new tensors (later changes to the clients' tensors do not affect it).
    """
    spec = get_method(method)
    reduction = resolve_reduction(spec, reduction)
    svd_energy = check_svd_energy(svd_energy)
    shapes = validate_updates(updates)
    if spec.share is not None:  # the same running sums a streamed round folds its replies into
        ranks = [r for u in updates for r in {u.rank(m) for m in u.factors}] or [1]
        total = RoundSum(
            spec, reduction, ranks=ranks, svd_energy=svd_energy, round_=round_, held=held
        )
        for u in updates:
            total.add(u)
        return total.finish()
    out_dtype = _promoted_dtype(updates)
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    num_examples = [int(u.num_examples) for u in updates]
    factors: dict[str, FactorPair] = {}
    for module in shapes:
        pairs = [u.scaled_factors(module, work) for u in updates]
        factors[module] = spec.combine([a for a, _ in pairs], [bh for _, bh in pairs], num_examples)
    dense = average_dense(updates)
    return GlobalUpdate(spec.name, reduction, factors, out_dtype, dense, svd_energy=svd_energy)


class CollectedRound:
    """A round of a method without a ``share`` (its weights need every client at once): the
    updates are kept and aggregated together at the end; the same ``add``/``finish`` as
    :class:`.streaming.RoundSum`."""

    def __init__(
        self, method: str, reduction: str | None = None, svd_energy: float = DEFAULT_SVD_ENERGY
    ) -> None:
        self.method, self.reduction, self.svd_energy = method, reduction, svd_energy
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        self.updates.append(update)

    def finish(self) -> GlobalUpdate:
        return aggregate(self.method, self.updates, self.reduction, svd_energy=self.svd_energy)


def open_round(
    method: str,
    reduction: str | None = None,
    *,
    ranks: Sequence[int],
    held: HeldSource | None = None,
    svd_energy: float = DEFAULT_SVD_ENERGY,
    round_: int = 1,
) -> RoundSum | CollectedRound:
    """Where one round's updates are folded in as they arrive: running sums
    (:class:`.streaming.RoundSum`, for the population's ``ranks``; ``held``: where the round's
    fixed factors come from, ``round_`` the round) when the method has a ``share``, else a list
    aggregated at the end. ``svd_energy``: as :func:`aggregate`."""
    spec = get_method(method)
    if spec.share is None:
        return CollectedRound(spec.name, reduction, svd_energy)
    return RoundSum(spec, reduction, ranks=ranks, held=held, svd_energy=svd_energy, round_=round_)


def average_dense(updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Example-weighted mean ``sum_k p_k X_k`` of each dense extra parameter (FedAvg), float32
    (float64 if any input is), as every method treats parameters trained in full."""
    if not updates or not updates[0].dense:
        return {}
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    p = (n / n.sum()).tolist()
    out = {}
    for name in sorted(updates[0].dense):
        tensors = [u.dense[name] for u in updates]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        total = torch.zeros(tensors[0].shape, dtype=dtype)
        for w, t in zip(p, tensors, strict=True):
            total += w * t.detach().to("cpu", dtype)
        out[name] = total
    return out


def _promoted_dtype(updates: Sequence[ClientUpdate]) -> torch.dtype:
    """The promoted dtype of every factor; float32 when no client has a LoRA (dense extras
    only), so the global update always names a real dtype (its start basis records it)."""
    dtype = None
    for u in updates:
        for a, b in u.factors.values():
            for t in (a, b):
                dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype is None else dtype
