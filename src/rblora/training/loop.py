"""One client's local training: AdamW on the trainable (LoRA) parameters, no HF Trainer.

Per epoch the examples are ordered (seeded shuffle, optionally length-grouped), cut into
micro-batches of ``micro_batch_size`` padded to their own longest sequence, and every
``batch_size / micro_batch_size`` micro-batches form one optimizer step (an epoch's last step may
be smaller). The loss of a step is token-weighted: the summed cross-entropy of all target tokens of
all its micro-batches divided by their total count, so a step's update does not depend on how the
batch is split into micro-batches (a mean of per-micro-batch means would weight tokens of short
micro-batches more). HF's Trainer does the same since it passes ``num_items_in_batch``.

Learning rate: linear warmup from 0 over ``warmup`` steps, then linear decay to 0 at the end
(HF's "linear" schedule: step i of n uses ``lr * i / w`` for i < w, else
``lr * (n - i) / (n - w)``). Gradients are clipped to ``max_grad_norm`` before each step.

Randomness: the data order uses a ``torch.Generator`` seeded with ``config.seed``; LoRA dropout
draws from the global torch RNG, which is forked (saved and restored around the call) and seeded
with ``config.seed + 1`` inside, so the caller's RNG is untouched and two runs are bitwise equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rblora.training.batching import collate, count_targets, epoch_order
from rblora.training.config import TrainConfig
from rblora.training.loss import causal_lm_loss_sum

Progress = bool | str | Callable[[int, int, float], None] | None


@dataclass
class LocalResult:
    """What one client's local training produced (the weights stay in the model)."""

    loss: float
    """Mean over optimizer steps of the token-weighted step loss."""
    losses: list[float] = field(default_factory=list)
    """Token-weighted loss of each optimizer step."""
    steps: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Input tokens processed (unpadded, summed over epochs)."""
    seconds: float = 0.0
    """Wall-clock time of the loop."""
    examples: int = 0
    """Training examples of the client (its dataset size, not multiplied by epochs)."""


def _plan(
    examples: Sequence[dict], config: TrainConfig, generator: torch.Generator
) -> list[list[list[int]]]:
    """All optimizer steps of the run: each a list of micro-batches (lists of indices)."""
    lengths = [len(e["input_ids"]) for e in examples]
    steps = []
    for _ in range(config.num_epochs):
        micro = epoch_order(lengths, config.micro_batch_size, config.group_by_length, generator)
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
        bar.set_postfix(loss=f"{loss:.4f}")

    return update, bar.close


def train_local(
    model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    config: TrainConfig,
    *,
    pad_token_id: int = 0,
    progress: Progress = None,
) -> LocalResult:
    """Train ``model``'s trainable parameters on tokenized ``examples`` (see the module doc).

    ``model``: a PEFT model (from ``rblora.adapters.attach_lora``) or a transformers causal LM
    with some parameters requiring grad. ``examples``: ``[{"input_ids", "labels"}]`` from
    ``tokenize_records``. ``pad_token_id`` only fills padded positions (masked and unlabelled).
    ``progress``: None/False (silent), True or a description (a tqdm bar of optimizer steps), or a
    callable ``(step, total_steps, step_loss)``. The model is left in its previous train/eval mode.
    """
    if not examples:
        raise ValueError("train_local: no training examples")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_local: the model has no trainable parameters (attach a LoRA first)")
    use_bf16 = config.use_bf16()
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
    plan = _plan(examples, config, torch.Generator().manual_seed(config.seed))
    total = len(plan)
    warmup = config.warmup_steps(total)
    opt = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
    )
    update, close = _progress_callback(progress, total)
    targets = [count_targets(e) for e in examples]
    was_training = model.training
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    try:
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            for i, step in enumerate(plan):
                n_targets = sum(targets[j] for mb in step for j in mb)
                step_loss = 0.0
                for mb in step:
                    # Right padding under causal attention needs no mask: a real token only
                    # sees earlier (real) tokens, and pads carry no label. Without a mask SDPA
                    # takes its causal kernel (~12% faster a step on SmolLM2, same logits).
                    ids, _, labels = collate([examples[j] for j in mb], pad_token_id)
                    tokens += sum(len(examples[j]["input_ids"]) for j in mb)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                        loss_sum = causal_lm_loss_sum(lm, ids, None, labels, compute_dtype)
                    if n_targets:
                        (loss_sum / n_targets).backward()
                    step_loss += loss_sum.item()
                step_loss /= max(1, n_targets)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm, foreach=True)
                for group in opt.param_groups:
                    group["lr"] = config.learning_rate * _lr_factor(i, total, warmup)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(step_loss)
                update(i + 1, total, step_loss)
    finally:
        close()
        model.train(was_training)
    return LocalResult(
        loss=sum(losses) / len(losses),
        losses=losses,
        steps=len(losses),
        tokens=tokens,
        seconds=time.perf_counter() - start,
        examples=len(examples),
    )
