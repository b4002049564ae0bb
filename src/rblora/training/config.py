"""Defaults of one client's local training, in one place (the seed's values unless noted)."""

from __future__ import annotations

from dataclasses import dataclass

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
    split_by_length: bool = False
    """Run a micro-batch as several forward passes of similar lengths when that saves padded
    positions (``batching.split_by_length``): each optimizer step has the same examples and the
    same loss (its summed loss over its count of terms), but the float rounding and the LoRA
    dropout draws differ. Needs a length per example (language models)."""
    split_call_cost: int = 64
    """For ``split_by_length``: what one more forward and backward pass costs, in padded
    positions (SmolLM2-135M on a 2-core CPU: see docs/scale.md)."""
    cutoff_len: int = 512
    """Truncate tokenized examples to this many tokens."""
    train_on_inputs: bool = True
    """Also train on the prompt tokens (seed default); False masks them out of the loss."""
    bf16: bool | str = "auto"
    """bf16 autocast: True, False or "auto" (on when a timed matmul on the model's device is
    clearly faster in bf16; see ``rblora.utils.device.bf16_decision``)."""
    max_abs_weight: float = 1e4
    """Training stops as diverged when a trainable weight exceeds this magnitude (or any loss,
    gradient or weight is not finite). LoRA factors start near 1/sqrt(d_in) and stay O(1); at
    1e4 the update B @ A is of order 1e8 per entry and the model's output is noise."""
    max_loss_rise: float = 5.0
    """Training stops as diverged when a step's loss exceeds the first step's loss by more than
    this, in the loss's units (nats for the cross-entropy of the shipped tasks: 5 is a 148-fold
    perplexity); ``math.inf`` disables. An exploding run can stay finite with small weights
    (SmolLM2 at lr 0.1 to 3e3: +7.5 to +16 at the second step, docs/local-training.md), while a
    healthy one's noisy steps stay well below (+2.2 at most measured; details there)."""
    seed: int = 42
    """Seed of the data order and of LoRA dropout."""
    prune_lambda: float = 0.0
    """HETLoRA's rank self-pruning (:mod:`rblora.training.rank_pruning`, our reading): the
    penalty's weight on the norm of the LoRA's last components; 0: no penalty, no pruning."""
    prune_gamma: float = 0.5
    """The share of its rank a client keeps when it prunes, in (0, 1)."""

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
        if (
            isinstance(self.split_call_cost, bool)
            or not isinstance(self.split_call_cost, int)
            or self.split_call_cost < 0
        ):
            raise ValueError(
                f"TrainConfig.split_call_cost must be an integer >= 0, got {self.split_call_cost!r}"
            )
        for name in ("max_abs_weight", "max_loss_rise"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        # AdamW's first step moves weights by up to lr / (1 - beta1) = 10 lr, in float32
        if not self.learning_rate * 10 < torch.finfo(torch.float32).max:
            raise ValueError(
                f"TrainConfig.learning_rate {self.learning_rate!r} overflows float32 in AdamW's "
                f"first step (10 x lr > {torch.finfo(torch.float32).max:.3g})"
            )
        for name in ("learning_rate", "weight_decay", "warmup", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        from rblora.training.rank_pruning import check_gamma, check_lambda

        check_lambda(self.prune_lambda)
        check_gamma(self.prune_gamma)
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"TrainConfig.bf16 must be True, False or 'auto', got {self.bf16!r}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps."""
        return round(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)
