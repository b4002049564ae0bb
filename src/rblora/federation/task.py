"""What the round loop needs from a task (causal LM, vision transformer, ...).

The loop is written once; a task supplies local training, evaluation of a global update, merging
into its base weights and adapter export. Everything model-specific lives behind this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rblora.adapters.spec import Factors
from rblora.federation.server import ClientSpec


@dataclass
class ClientResult:
    """One client's round: its trained LoRA factors (raw PEFT weights, scale not folded in)."""

    factors: Factors
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)  # loss, steps, tokens, seconds, ...


class Task(Protocol):
    """A federated fine-tuning task over one base model held in memory."""

    def num_examples(self, client_id: int) -> int:
        """Training examples of a client (its aggregation weight)."""

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Adapted module name -> (d_out, d_in)."""

    def train_client(
        self, spec: ClientSpec, start: Factors | None, *, seed: int, round_: int
    ) -> ClientResult:
        """Train a rank-``spec.rank`` LoRA from ``start`` (None: fresh) on the client's data."""

    def evaluate(self, delta: Factors, *, round_: int) -> dict[str, Any]:
        """Metrics of base + ``delta`` (factors with the scale folded in: dW = B @ A)."""

    def merge_into_base(self, delta: Factors) -> None:
        """Fold ``delta`` into the base weights for good (merge protocol)."""

    def save_adapter(
        self, path: Path, factors: Factors, *, rank: int, lora_alpha: float, use_rslora: bool
    ) -> None:
        """Write a PEFT adapter folder loadable on this task's base model."""
