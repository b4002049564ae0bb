"""Order examples into micro-batches and optimizer steps; pad a micro-batch.

``group_by_length`` follows the rule of transformers' length-grouped sampler (our own code): a
seeded random permutation is cut into mega-batches of ``m * micro_batch_size`` examples with
``m = min(n // (4 * micro_batch_size), 50)``, at least 1; each mega-batch is sorted by length
(longest first) and cut into micro-batches, which then hold similar lengths (little padding), and
the micro-batch holding the longest example of all goes first (an out-of-memory error shows on
the first step, not the last). A small client (n < 8 micro-batches) gets mega-batches of one
micro-batch, i.e. a plain random order: a fixed mega-batch of 50 micro-batches would sort its
whole data set, giving the same batches in every seed, round and epoch.
"""

from __future__ import annotations

import torch

from rblora.training.tokenize import IGNORE_INDEX

MAX_MEGA_BATCH_MULT = 50


def mega_batch_mult(n: int, micro_batch_size: int) -> int:
    """Micro-batches per mega-batch: ``min(n // (4 * micro_batch_size), 50)``, at least 1."""
    return max(1, min(n // (4 * micro_batch_size), MAX_MEGA_BATCH_MULT))


def epoch_order(
    lengths: list[int] | None,
    n: int,
    micro_batch_size: int,
    group_by_length: bool,
    generator: torch.Generator,
) -> list[list[int]]:
    """Micro-batches (lists of example indices) for one epoch of ``n`` examples; the last one may
    be short. ``lengths`` (one per example) is needed only with ``group_by_length``."""
    perm = torch.randperm(n, generator=generator).tolist()
    if group_by_length:
        if lengths is None or len(lengths) != n:
            raise ValueError("group_by_length needs one length per example")
        mega = mega_batch_mult(n, micro_batch_size) * micro_batch_size
        perm = [
            i
            for start in range(0, n, mega)
            for i in sorted(perm[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [perm[s : s + micro_batch_size] for s in range(0, n, micro_batch_size)]
    if group_by_length:
        longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


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


def sequence_length(example: dict[str, list[int]]) -> int:
    """Tokens of a tokenized example (its length for length grouping and throughput)."""
    return len(example["input_ids"])


def count_targets(example: dict[str, list[int]]) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not -100."""
    return sum(1 for x in example["labels"][1:] if x != IGNORE_INDEX)


def check_targets(examples: list[dict[str, list[int]]], who: str, cutoff_len: int) -> None:
    """Refuse ``who``'s tokenized examples when one of them keeps no target token.

    A client's weight in aggregation is its number of examples, so every example must carry a
    target: one without (a ``cutoff_len`` too short for even one response token after the
    causal shift, or a response that tokenizes to nothing of its own) would train on nothing yet
    count. ValueError naming ``who``, how many examples keep no target and what to raise. An
    empty list passes (on a Flower node, the other clients' data is left empty).
    """
    empty = sum(1 for e in examples if not count_targets(e))
    if empty:
        raise ValueError(
            f"{who}: {empty} of its {len(examples)} training records keep no token to train on "
            f"within cutoff_len={cutoff_len} (a record's prompt gives way from the left, so this "
            "needs a cutoff below 2 tokens or a response with no token of its own); raise "
            "--cutoff_len or fix the records"
        )


def split_by_length(batch: list[int], lengths: list[int], call_cost: int) -> list[list[int]]:
    """Cut a micro-batch (example indices) into forward passes of similar lengths.

    A micro-batch is padded to its longest sequence, so a short sequence beside a long one costs
    the long one's compute. The groups minimise ``sum over groups of (size x longest length +
    call_cost)``, ``call_cost`` being what one more forward and backward pass costs, in padded
    positions; they are runs of the batch sorted by length, longest first. When one group is
    best the batch comes back unchanged (``[batch]``, in its order).
    """
    n = len(batch)
    if n < 2:
        return [list(batch)]
    order = sorted(batch, key=lambda j: -lengths[j])  # stable: ties keep the batch's order
    sizes = [lengths[j] for j in order]
    # best[i]: least cost of the first i examples; cut[i]: where its last group starts
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + (end - start) * sizes[start] + call_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    if cut[n] == 0:
        return [list(batch)]
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]
