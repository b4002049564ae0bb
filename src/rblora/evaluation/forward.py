"""Batched log-likelihood of scored segments: the one place that runs the model.

Rows (see `encoding`) are sorted by length and packed greedily into batches of at most
``batch_tokens`` padded tokens and ``batch_size`` rows. Each batch is left-padded, so the needed
logits are a common tail of every row and ``logits_to_keep`` skips the LM head elsewhere. The
attention pattern (prefix causal; each segment sees the prefix and itself) is passed as a 4-D
additive mask with explicit position ids, which Hugging Face causal LMs use as given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from rblora.evaluation.encoding import Row


def plan_batches(rows: Sequence[Row], batch_tokens: int, batch_size: int) -> list[list[int]]:
    """Row indices per batch: longest rows first, each batch <= batch_tokens padded tokens.

    A row longer than ``batch_tokens`` runs alone.
    """
    if batch_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"batch_tokens and batch_size must be >= 1, got {batch_tokens}, {batch_size}"
        )
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].length, i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = rows[current[0]].length if current else rows[i].length
        if current and ((len(current) + 1) * width > batch_tokens or len(current) >= batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def build_batch(rows: Sequence[Row], pad_id: int, mask_dtype: torch.dtype):
    """Tensors for one batch of ``B`` rows padded on the left to ``T`` tokens.

    Returns input_ids (B, T), position_ids (B, T), mask (B, 1, T, T) additive (0 or the dtype's
    minimum), keep (the number K of trailing positions whose logits are needed) and the targets:
    row (M,), position within the kept tail (M,), token (M,), slot (M,) for the M scored tokens.
    """
    width = max(r.length for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    t_row, t_pos, t_tok, t_slot = [], [], [], []
    for b, row in enumerate(rows):
        start = width - row.length
        p = len(row.prefix)
        ids[b, start : start + p] = torch.tensor(row.prefix)
        pos[b, start : start + p] = torch.arange(p)
        seg[b, start : start + p] = 0
        last_prefix = start + p - 1
        at = start + p
        for k, s in enumerate(row.segments, start=1):
            n_tok = len(s.tokens)
            ids[b, at : at + n_tok] = torch.tensor(s.tokens)
            pos[b, at : at + n_tok] = torch.arange(p, p + n_tok)
            seg[b, at : at + n_tok] = k
            for j in range(n_tok - s.n_scored, n_tok):
                t_row.append(b)
                t_pos.append(last_prefix if j == 0 else at + j - 1)
                t_tok.append(s.tokens[j])
                t_slot.append(s.slot)
            at += n_tok
    keep = width - min(t_pos)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    seg_q, seg_k = seg[:, :, None], seg[:, None, :]
    allowed = causal & ((seg_k == 0) | (seg_k == seg_q))  # pads (-1) see only pads
    mask = torch.zeros(allowed.shape, dtype=mask_dtype)
    mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    targets = (
        torch.tensor(t_row),
        torch.tensor(t_pos) - (width - keep),
        torch.tensor(t_tok),
        torch.tensor(t_slot),
    )
    return ids, pos, mask[:, None], keep, targets


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sum_logprobs(
    model,
    rows: Sequence[Row],
    n_slots: int,
    *,
    pad_id: int,
    batch_tokens: int,
    batch_size: int,
    autocast_bf16: bool = False,
    progress: bool = False,
    desc: str = "scoring",
) -> torch.Tensor:
    """Sum of log p(token | its context) over each slot's scored tokens -> (n_slots,) float64."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    totals = torch.zeros(n_slots, dtype=torch.float64)
    batches = plan_batches(rows, batch_tokens, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    with eval_mode(model), torch.inference_mode(), autocast:
        for batch in batches:
            ids, pos, mask, keep, (t_row, t_pos, t_tok, t_slot) = build_batch(
                [rows[i] for i in batch], pad_id, dtype
            )
            out = model(
                input_ids=ids.to(device),
                position_ids=pos.to(device),
                attention_mask=mask.to(device),
                logits_to_keep=keep,
                use_cache=False,
            )
            logits = out.logits[t_row.to(device), t_pos.to(device)].float()  # (M, V)
            picked = logits.gather(1, t_tok.to(device)[:, None])[:, 0]
            logprob = (picked - torch.logsumexp(logits, dim=-1)).double().cpu()
            totals.index_add_(0, t_slot, logprob)
    return totals
