"""Evaluation defaults, in one place."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("packed", "flat")


@dataclass(frozen=True)
class EvalConfig:
    batch_tokens: int = 4096
    """Padded tokens per forward pass (rows x longest row): bounds memory and padding waste."""
    batch_size: int = 64
    """At most this many rows per forward pass."""
    strategy: str = "packed"
    """packed: one row per question (prompt once, options after it); flat: one row per option."""
    max_length: int | None = None
    """Longest scored sequence (prompt + option) in tokens; None = the model's context size."""
    autocast_bf16: bool = False
    """Run the forward passes under CPU/GPU bf16 autocast (faster on CPUs with AVX-512 BF16)."""
    cutoff_len: int = 512
    """Held-out loss: truncate prompt + response to this many tokens (as training does)."""
    add_eos: bool = True
    """Held-out loss: the response ends with the EOS token (as training does)."""
    progress: bool = False
    """Show a progress bar over batches."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        for name in ("batch_tokens", "batch_size", "cutoff_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")


DEFAULTS = EvalConfig()
