"""What the server and a client exchange in a round, independent of transport and of the task.

    ClientSpec    what the server knows of a client (rank, scaling, examples), before any reply
    ClientStart   what the server sends a client: the adapter it starts its round from
    ClientResult  what a client's local training produced (factors, dense extras, metrics)
    UpdateLayout  what every client's update holds (modules and their shapes, dense extras)

The round core (:mod:`rblora.federation`), the tasks (:mod:`rblora.tasks`) and every engine
import these; this module imports nothing of theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rblora.aggregation.types import Factors, ModuleDelta


@dataclass(frozen=True)
class ClientSpec:
    """What the server knows of a client: its LoRA rank and scaling, and (when the server knows
    it) its number of training examples, the client's aggregation weight.

    ``num_examples`` None: not known yet (a data folder without partition metadata, before the
    node said how many it holds)."""

    client_id: int
    rank: int
    lora_alpha: float
    use_rslora: bool = False
    num_examples: int | None = None

    def scale(self, rank: int) -> float:
        """The client's PEFT scale at ``rank`` (its own, or a smaller one it pruned to)."""
        from rblora.aggregation.types import lora_scale

        return lora_scale(self.lora_alpha, rank, self.use_rslora)


@dataclass
class ClientStart:
    """What a client starts a round from, and what it had to download for it.

    ``factors``: raw PEFT factors of the client's rank, or None for a fresh LoRA (round 1, and
    every round of the merge protocol). ``dense``: the dense extra parameters to start from ({}:
    the task's initial ones). ``base_delta``: under the merge protocol, the running total the base
    weights must hold (``W0 + base_delta``), and likewise the residuals a method folds into the
    base (FedEx-LoRA); {} otherwise. ``download_bytes``: what the client
    must receive that it does not have yet (see ``FederatedServer.deliver``); a factor the
    method's protocol does not send (a frozen A) is not counted: the client draws it itself.
    """

    factors: Factors | None
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    base_delta: dict[str, ModuleDelta] = field(default_factory=dict)
    download_bytes: int = 0
    trains: tuple[str, ...] = ("A", "B")
    """The LoRA factors local training updates (the method's client protocol,
    :class:`rblora.protocol.factors.FactorPlan`); the others keep their start values."""


@dataclass
class ClientResult:
    """One client's round: its trained LoRA factors (raw PEFT weights, scale not folded in), its
    trained dense extra parameters, and how much data produced them."""

    factors: Factors
    num_examples: int
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # loss, steps, tokens, seconds, ...


@dataclass(frozen=True)
class UpdateLayout:
    """What every client's update holds, known to the server before any reply (the task says):
    ``modules``: adapted module -> ``(d_out, d_in)`` of its LoRA factors (empty exactly when no
    LoRA is trained, the head-only baseline); ``dense``: dense extra parameter -> shape."""

    modules: dict[str, tuple[int, int]]
    dense: dict[str, tuple[int, ...]] = field(default_factory=dict)


CLIENT_METRICS: dict[str, type] = {
    "loss": float,
    "val_loss": float,
    "steps": int,
    "tokens": int,
    "images": int,
    "seconds": float,
}
"""The metrics a client's record may carry (name -> kind): what the tasks report of local
training. Anything else a client sends is dropped (see :func:`clean_metrics`)."""


def clean_metrics(metrics: Any) -> tuple[dict[str, float | int], list[str]]:
    """``(kept, dropped)``: the finite numbers of ``metrics`` under the names of
    :data:`CLIENT_METRICS` (counts as non-negative integers), and the names of what was dropped.
    A client's metrics are its word only: they never set a record's identity fields and never
    weigh anything."""
    if not isinstance(metrics, dict):
        return {}, ["metrics (not a mapping)"]
    kept: dict[str, float | int] = {}
    dropped = []
    for name, value in metrics.items():
        kind = CLIENT_METRICS.get(name)
        if value is None and kind is not None:
            continue  # "not measured" (e.g. no step carried a target)
        number = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (isinstance(value, float) or abs(value) < 2**63)  # a huge int is not converted
            and math.isfinite(value)
        )
        if kind is float and number:
            kept[name] = float(value)
        elif kind is int and number and float(value).is_integer() and value >= 0:
            kept[name] = int(value)
        else:
            dropped.append(str(name))
    return kept, dropped


def tensor_bytes(tensors) -> int:
    """Bytes of ``tensors`` as stored (``numel * element_size``)."""
    return sum(t.numel() * t.element_size() for t in tensors)
