"""Defaults of one client's local training, in one place (the seed's values unless noted)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TrainConfig:
    """Local training settings; validated on construction."""

    micro_batch_size: int = 8
    """Sequences per forward/backward pass (seed: local_micro_batch_size)."""
    batch_size: int = 64
    """Sequences per optimizer step (gradients accumulate over batch_size / micro_batch_size)."""
    num_epochs: int = 1
    """Passes over the client's data per round (the seed's commands use 1)."""
    learning_rate: float = 3e-5
    """Peak AdamW learning rate (seed: local_learning_rate)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (the seed uses the transformers default, 0)."""
    warmup: float = 0.0
    """Linear warmup: a fraction of the optimizer steps if < 1, else a number of steps (seed: 0)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of the LoRA parameters to this; 0 disables (HF default 1)."""
    group_by_length: bool = False
    """Batch sequences of similar length together (less padding), as HF's length-grouped sampler."""
    cutoff_len: int = 512
    """Truncate tokenized examples to this many tokens."""
    train_on_inputs: bool = True
    """Also train on the prompt tokens (seed default); False masks them out of the loss."""
    bf16: bool | str = "auto"
    """bf16 autocast: True, False or "auto" (on when the CPU has native bf16 matmul)."""
    seed: int = 42
    """Seed of the data order and of LoRA dropout."""

    def __post_init__(self):
        for name in ("micro_batch_size", "batch_size", "num_epochs", "cutoff_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        for name in ("learning_rate", "weight_decay", "warmup", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"TrainConfig.bf16 must be True, False or 'auto', got {self.bf16!r}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def use_bf16(self) -> bool:
        """Resolve ``bf16``: "auto" means on iff the CPU does bf16 matmul natively."""
        return cpu_has_native_bf16() if self.bf16 == "auto" else bool(self.bf16)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps."""
        return round(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)


def cpu_has_native_bf16() -> bool:
    """True if the CPU flags list avx512_bf16 or amx_bf16 (Linux), else oneDNN's own bf16 check.

    Without native bf16 the matmuls are emulated and much slower than fp32 (measured about 40x
    on an AVX2-only CPU), so "auto" must not turn autocast on there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = None
    if flags is not None:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
