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
