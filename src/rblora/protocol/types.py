"""What the server and a client exchange in a round, independent of transport and of the task.

    ClientSpec    what the server knows of a client (rank, scaling, examples), before any reply
    ClientStart   what the server sends a client: the adapter it starts its round from
    ClientResult  what a client's local training produced (factors, dense extras, metrics)

The round core (:mod:`rblora.federation`), the tasks (:mod:`rblora.tasks`) and every engine
import these; this module imports nothing of theirs.
"""

from __future__ import annotations

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


@dataclass
class ClientStart:
    """What a client starts a round from, and what it had to download for it.

    ``factors``: raw PEFT factors of the client's rank, or None for a fresh LoRA (round 1, and
    every round of the merge protocol). ``dense``: the dense extra parameters to start from ({}:
    the task's initial ones). ``base_delta``: under the merge protocol, the running total the base
    weights must hold (``W0 + base_delta``; {} otherwise). ``download_bytes``: what the client
    must receive that it does not have yet (see ``FederatedServer.deliver``).
    """

    factors: Factors | None
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    base_delta: dict[str, ModuleDelta] = field(default_factory=dict)
    download_bytes: int = 0


@dataclass
class ClientResult:
    """One client's round: its trained LoRA factors (raw PEFT weights, scale not folded in), its
    trained dense extra parameters, and how much data produced them."""

    factors: Factors
    num_examples: int
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # loss, steps, tokens, seconds, ...


def tensor_bytes(tensors) -> int:
    """Bytes of ``tensors`` as stored (``numel * element_size``)."""
    return sum(t.numel() * t.element_size() for t in tensors)
