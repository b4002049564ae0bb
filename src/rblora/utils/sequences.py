"""Token-sequence helpers shared by training and evaluation tokenization."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (e.g. a prompt's token ids and the
    ids of prompt + response, where a tokenizer may merge across the boundary)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def keep_response(ids: Sequence[int], n_prompt: int, n_lead: int, cutoff_len: int):
    """``ids`` (``n_prompt`` prompt tokens, the first ``n_lead`` of them the tokenizer's leading
    special tokens such as BOS, then the response) cut to at most ``cutoff_len`` tokens so that
    the response survives: prompt tokens give way from the left, just after the leading special
    tokens (training and the held-out loss; the multiple-choice scorer also cuts prompts from
    the left, at the model's context length, see ``evaluation.encoding.split_continuations``).
    A response that alone exceeds the room keeps its start. Returns ``(ids, prompt tokens
    kept)``."""
    ids = list(ids)
    excess = len(ids) - cutoff_len
    if excess <= 0:
        return ids, n_prompt
    n_lead = max(0, min(n_lead, n_prompt, cutoff_len - 1))
    droppable = n_prompt - n_lead
    if excess <= droppable:
        return ids[:n_lead] + ids[n_lead + excess :], n_prompt - excess
    return ids[:n_lead] + ids[n_prompt : n_prompt + cutoff_len - n_lead], n_lead


def leading_special_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before a text (e.g. ``[bos]``), found on a probe text."""
    probe = "a b"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []
