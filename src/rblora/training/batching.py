"""Order examples into micro-batches and optimizer steps; pad a micro-batch.

``group_by_length`` follows the idea of HF's length-grouped sampler (our own code): a seeded random
permutation is cut into mega-batches of ``50 * micro_batch_size`` examples, each mega-batch is
sorted by length (longest first), and consecutive runs of ``micro_batch_size`` become micro-batches.
Micro-batches then hold similar lengths (little padding) while the data order stays random across
mega-batches.
"""

from __future__ import annotations

import torch

from rblora.training.tokenize import IGNORE_INDEX

MEGA_BATCH_MULT = 50


def epoch_order(
    lengths: list[int], micro_batch_size: int, group_by_length: bool, generator: torch.Generator
) -> list[list[int]]:
    """Micro-batches (lists of example indices) for one epoch; the last one may be short."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = MEGA_BATCH_MULT * micro_batch_size
        perm = [
            i
            for start in range(0, len(perm), mega)
            for i in sorted(perm[start : start + mega], key=lambda j: -lengths[j])
        ]
    return [perm[s : s + micro_batch_size] for s in range(0, len(perm), micro_batch_size)]


def collate(
    examples: list[dict[str, list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Right-pad to the longest sequence of the micro-batch.

    Returns ``input_ids: (b, t)``, ``attention_mask: (b, t)`` or None when nothing is padded, and
    ``labels: (b, t)`` with -100 on padding.
    """
    t = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[row, :n] = 1
    padded = bool((mask == 0).any())
    return ids, (mask if padded else None), labels


def count_targets(example: dict[str, list[int]]) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not -100."""
    return sum(1 for x in example["labels"][1:] if x != IGNORE_INDEX)
