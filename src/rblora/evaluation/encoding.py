"""Tokenization for scoring: which tokens a continuation owns, and how rows are laid out.

Boundary rule. The prompt and each full text ``prompt + continuation`` are tokenized on their own
(with the tokenizer's leading special tokens such as BOS, never trailing ones such as EOS); the
continuation's tokens are the tail of the full text's tokens after their longest common prefix with
the prompt's tokens. So the scored tokens are exactly those the full text produces; if the tokenizer
merges across the boundary, the merged token is scored as part of the continuation.

Truncation keeps every continuation whole and drops prompt tokens from the left until the longest
option fits ``max_length`` (positions ``0 .. max_length - 1``).

A `Row` is one sequence the model reads: a shared prefix followed by one or more segments. Each
segment attends to the prefix and to itself only and its positions restart after the prefix, so a
row holding all options of a question scores each option exactly as if it were alone after the
prompt (the prompt is computed once). A segment's last ``n_scored`` tokens are scored into ``slot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    tokens: tuple[int, ...]
    n_scored: int  # score the last n_scored tokens (1..len(tokens))
    slot: int  # index of the output sum this segment's log-likelihood goes to


@dataclass(frozen=True)
class Row:
    prefix: tuple[int, ...]  # >= 1 token
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(s.tokens) for s in self.segments)

    @property
    def tail(self) -> int:
        """Number of trailing positions whose logits are needed (last prefix token onwards)."""
        return 1 + sum(len(s.tokens) for s in self.segments)


def leading_special_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before a text (e.g. ``[bos]``), found on a probe text."""
    probe = "a b"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the leading special tokens (one batched tokenizer call)."""
    lead = leading_special_ids(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [lead + list(x) for x in ids]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_continuations(
    prompt_ids: list[int], full_ids: Sequence[list[int]], max_length: int | None
) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], int]]]:
    """Shared prefix and per-option (suffix tokens, number of scored tail tokens).

    prompt_ids: tokens of the prompt; full_ids[i]: tokens of prompt + continuation i.
    The prefix is the part common to every option (at least one token: a continuation starting
    the sequence is scored from its second token). Raises ValueError if a continuation has no
    token of its own or if no prompt token fits ``max_length`` next to the longest option.
    """
    owned = []
    for ids in full_ids:
        n_cont = len(ids) - _common_prefix(prompt_ids, ids)
        if n_cont < 1:
            raise ValueError("a continuation produced no tokens of its own")
        owned.append(n_cont)
    shared = min(len(ids) - n for ids, n in zip(full_ids, owned, strict=True))
    if shared < 1:  # nothing predicts the first token: it becomes the prefix, unscored
        shared = 1
        owned = [min(n, len(ids) - 1) for ids, n in zip(full_ids, owned, strict=True)]
        if min(owned) < 1:
            raise ValueError("a one-token text cannot be scored (nothing predicts its token)")
    prefix = tuple(full_ids[0][:shared])
    suffixes = [(tuple(ids[shared:]), n) for ids, n in zip(full_ids, owned, strict=True)]
    if max_length is not None:
        longest = max(len(s) for s, _ in suffixes)
        keep = max_length - longest
        if keep < 1:
            raise ValueError(
                f"an option of {longest} tokens leaves no room for the prompt in "
                f"max_length={max_length}"
            )
        prefix = prefix[-keep:]
    return prefix, suffixes
