"""One client's local training: AdamW on the trainable (LoRA) parameters, no HF Trainer.

Per epoch the examples are ordered (seeded shuffle, optionally length-grouped), cut into
micro-batches of ``micro_batch_size`` and every ``batch_size / micro_batch_size`` micro-batches
form one optimizer step (an epoch's last step may be smaller). What a micro-batch's loss is comes
from the task: ``loss_fn(model, examples) -> (summed loss, number of terms)`` (target tokens for a
causal LM, images for a classifier; the default is the causal-LM loss). The loss of a step is the
sum over its micro-batches divided by their total count of terms, so a step's update does not
depend on how the batch is split into micro-batches (a mean of per-micro-batch means would weight
terms of short micro-batches more). HF's Trainer does the same since it passes
``num_items_in_batch``. Each micro-batch's summed loss is back-propagated as it comes and the
accumulated gradients are divided by the step's count before clipping. A step with no loss term
at all (no response token left within ``cutoff_len``) has nothing to learn from: it makes no
update and reports no loss (a 0 would read as perfect training).

Learning rate: linear warmup from 0 over ``warmup`` steps, then linear decay to 0 at the end
(HF's "linear" schedule: step i of n uses ``lr * i / w`` for i < w, else
``lr * (n - i) / (n - w)``). Gradients are clipped to ``max_grad_norm`` before each step.

Device and precision: everything runs where the model's parameters are; ``bf16="auto"`` times a
matmul on that device once per process (``rblora.utils.device.bf16_decision``).

Divergence: a non-finite loss or gradient norm, a step loss more than ``config.max_loss_rise``
above the first step's (an explosion that stays finite), or a trainable weight that is not finite
or exceeds ``config.max_abs_weight`` after a step, raises :class:`TrainingDiverged` at once (the
weights are then garbage and must not be saved or aggregated). The first step's loss is the loss
of the model training started from (no update has been made yet), so the rule asks "did training
make the model much worse than it was"; noise of small batches rises far less
(docs/local-training.md has the measured figures).

Randomness: the data order uses a ``torch.Generator`` seeded with ``config.seed``; LoRA dropout
draws from the global torch RNG, which is forked (saved and restored around the call) and seeded
with ``config.seed + 1`` inside, so the caller's RNG is untouched and two runs are bitwise equal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rblora.training.batching import epoch_order, sequence_length, split_by_length
from rblora.training.config import TrainConfig
from rblora.training.loss import causal_lm_objective
from rblora.utils.device import use_bf16 as resolve_bf16

Progress = bool | str | Callable[[int, int, float | None], None] | None
LossFn = Callable[[nn.Module, Sequence[Any]], tuple[torch.Tensor, int]]
"""``loss_fn(model, examples) -> (summed loss: 0-d tensor with grad, number of loss terms)``."""


class TrainingDiverged(ValueError):
    """Local training produced a non-finite or exploding loss, gradient or weight."""


@dataclass
class LocalResult:
    """What one client's local training produced (the weights stay in the model)."""

    loss: float | None
    """Mean over optimizer steps of the step loss (summed loss / count of terms); None when no
    step had a loss term (a 0 there would read as perfect training)."""
    losses: list[float] = field(default_factory=list)
    """Loss of each optimizer step that had loss terms."""
    steps: int = 0
    """Optimizer steps taken. A step whose micro-batches hold no loss term (e.g. no response
    token within ``cutoff_len``) has no gradient: it is skipped, not taken and not counted."""
    tokens: int = 0
    """Input size processed, summed over epochs: ``length(example)`` (tokens for a causal LM;
    0 when the task gives no length)."""
    seconds: float = 0.0
    """Wall-clock time of the loop."""
    examples: int = 0
    """Training examples of the client (its dataset size, not multiplied by epochs)."""
    bf16: bool = False
    """Whether the loop ran under bf16 autocast."""


def _plan(
    lengths: list[int] | None, n: int, config: TrainConfig, generator: torch.Generator
) -> list[list[list[int]]]:
    """All optimizer steps of the run: each a list of micro-batches (lists of indices)."""
    steps = []
    for _ in range(config.num_epochs):
        micro = epoch_order(lengths, n, config.micro_batch_size, config.group_by_length, generator)
        k = config.accumulation_steps
        steps.extend(micro[s : s + k] for s in range(0, len(micro), k))
    return steps


def _lr_factor(i: int, total: int, warmup: int) -> float:
    if i < warmup:
        return i / warmup
    return max(0.0, (total - i) / max(1, total - warmup))


def _progress_callback(progress: Progress, total: int):
    """Returns (update(step, total, loss), close())."""
    if not progress:
        return (lambda *_: None), (lambda: None)
    if callable(progress):
        return progress, (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "steps", leave=False)

    def update(step, _total, loss):
        bar.update(1)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}")

    return update, bar.close


def _check_weights(params: list[torch.Tensor], limit: float, step: int) -> None:
    """Raise TrainingDiverged if a weight is not finite or above ``limit`` in magnitude."""
    peak = max(float(t) for t in torch._foreach_norm([p.detach() for p in params], math.inf))
    if not math.isfinite(peak) or peak > limit:
        raise TrainingDiverged(
            f"diverged at step {step}: a trainable weight reached {peak:.3g} (limit {limit:g}); "
            "lower the learning rate"
        )


def train_local(
    model: nn.Module,
    examples: Sequence[Any],
    config: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    length: Callable[[Any], int] | None = None,
    pad_token_id: int = 0,
    progress: Progress = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
) -> LocalResult:
    """Train ``model``'s trainable parameters on ``examples`` (see the module doc).

    ``model``: a PEFT model (from ``rblora.adapters.attach_lora``) or any module with some
    parameters requiring grad. ``examples``: whatever ``loss_fn`` takes; by default tokenized
    causal-LM examples ``[{"input_ids", "labels"}]`` from ``tokenize_records``, scored by the
    causal-LM loss (``pad_token_id`` only fills padded positions). ``length(example)``: its size
    for ``group_by_length`` and the ``tokens`` figure (default: ``len(input_ids)`` with the
    default loss, none otherwise). ``progress``: None/False (silent), True or a description (a
    tqdm bar of optimizer steps), or a callable ``(step, total_steps, step_loss)`` (``step_loss`` is
    None for a step without loss terms). ``penalty(model) -> 0-d tensor``: a regulariser
    added to each optimizer step's loss (after the data loss is averaged over the step's terms;
    e.g. HETLoRA's :func:`rblora.training.rank_pruning.tail_penalty`); the reported losses are
    the data loss alone. The model is
    left in its previous train/eval mode. Raises :class:`TrainingDiverged` (see the module doc).
    """
    if not examples:
        raise ValueError("train_local: no training examples")
    if loss_fn is None:
        loss_fn = causal_lm_objective(pad_token_id)
        length = length or sequence_length
    if config.group_by_length and length is None:
        raise ValueError("train_local: group_by_length needs a length function for the examples")
    if config.split_by_length and length is None:
        raise ValueError("train_local: split_by_length needs a length function for the examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_local: the model has no trainable parameters (attach a LoRA first)")
    bf16 = resolve_bf16(config.bf16, model)
    device_type = params[0].device.type
    lengths = [length(e) for e in examples] if length is not None else None
    plan = _plan(lengths, len(examples), config, torch.Generator().manual_seed(config.seed))
    total = len(plan)
    warmup = config.warmup_steps(total)
    opt = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
    )
    update, close = _progress_callback(progress, total)
    was_training = model.training
    losses: list[float] = []  # losses[0] is the reference of the explosion check
    tokens = 0
    start = time.perf_counter()
    try:
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            for i, step in enumerate(plan):
                step_sum, step_count = 0.0, 0
                for mb in step:
                    if lengths is not None:
                        tokens += sum(lengths[j] for j in mb)
                    passes = [mb]
                    if config.split_by_length:
                        passes = split_by_length(mb, lengths, config.split_call_cost)
                    for part in passes:
                        batch = [examples[j] for j in part]
                        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                            loss_sum, count = loss_fn(model, batch)
                        if count:
                            loss_sum.backward()
                        step_sum += loss_sum.item()
                        step_count += count
                if not step_count:  # nothing to learn from: no update, no loss to report
                    update(i + 1, total, None)
                    continue
                step_loss = step_sum / step_count
                if not math.isfinite(step_loss):
                    raise TrainingDiverged(f"diverged at step {i + 1}: the loss is {step_loss}")
                if losses and step_loss > losses[0] + config.max_loss_rise:
                    raise TrainingDiverged(
                        f"diverged at step {i + 1}: the loss rose from {losses[0]:.4g} at the "
                        f"first step to {step_loss:.4g} (limit: {config.max_loss_rise:g} above it)"
                    )
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(step_count)
                if penalty is not None:
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                        reg = penalty(model)
                    if not math.isfinite(float(reg.detach())):
                        raise TrainingDiverged(f"diverged at step {i + 1}: the penalty is {reg}")
                    if reg.requires_grad:
                        reg.backward()
                if config.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(
                        params, config.max_grad_norm, foreach=True
                    )
                    if not math.isfinite(float(norm)):
                        raise TrainingDiverged(
                            f"diverged at step {i + 1}: the gradient norm is {float(norm)}"
                        )
                for group in opt.param_groups:
                    group["lr"] = config.learning_rate * _lr_factor(i, total, warmup)
                opt.step()
                opt.zero_grad(set_to_none=True)
                _check_weights(params, config.max_abs_weight, i + 1)
                losses.append(step_loss)
                update(i + 1, total, step_loss)
    finally:
        # a step that raised (divergence) leaves its gradients on the parameters; a dense extra
        # (a classifier head) outlives the LoRA, and the next training would add to them
        opt.zero_grad(set_to_none=True)
        close()
        model.train(was_training)
    return LocalResult(
        loss=sum(losses) / len(losses) if losses else None,
        losses=losses,
        steps=len(losses),
        tokens=tokens,
        seconds=time.perf_counter() - start,
        examples=len(examples),
        bf16=bf16,
    )
