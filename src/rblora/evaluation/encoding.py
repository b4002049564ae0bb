"""Tokenization for scoring: which tokens a continuation owns, and how rows are laid out.

Boundary rule. The prompt and each full text ``prompt + continuation`` are tokenized on their own
(with the tokenizer's leading special tokens such as BOS, never trailing ones such as EOS); the
continuation's tokens are the tail of the full text's tokens after their longest common prefix with
the prompt's tokens. So the scored tokens are exactly those the full text produces; if the tokenizer
merges across the boundary, the merged token is scored as part of the continuation.

Start token. When no context token precedes every option (an empty context with a tokenizer that
adds no BOS, or a context merged whole into a continuation's first token), the tokenizer's BOS id,
else its EOS id, is the context (the lm-evaluation-harness convention), so every continuation
token is scored, the first one too; a tokenizer with neither is refused.

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

from rblora.utils.sequences import common_prefix, leading_special_ids


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


def start_token_id(tokenizer) -> int | None:
    """The token a sequence starts from when no context token precedes it: BOS, else EOS."""
    for value in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return None


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the leading special tokens (one batched tokenizer call)."""
    lead = leading_special_ids(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [lead + list(x) for x in ids]


def split_continuations(
    prompt_ids: list[int],
    full_ids: Sequence[list[int]],
    max_length: int | None,
    *,
    start_id: int | None,
) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], int]]]:
    """Shared prefix and per-option (suffix tokens, number of scored tail tokens).

    prompt_ids: tokens of the prompt; full_ids[i]: tokens of prompt + continuation i;
    start_id: ``start_token_id(tokenizer)``. The prefix is the prompt tokens common to every
    option; if there is none, it is ``(start_id,)`` and each option's tokens all follow it, so
    every continuation token is scored. Raises ValueError if a continuation has no token of its
    own, if a start token is needed but ``start_id`` is None, or if no prompt token fits
    ``max_length`` next to the longest option.
    """
    owned = []
    for ids in full_ids:
        n_cont = len(ids) - common_prefix(prompt_ids, ids)
        if n_cont < 1:
            raise ValueError("a continuation produced no tokens of its own")
        owned.append(n_cont)
    shared = min(len(ids) - n for ids, n in zip(full_ids, owned, strict=True))
    if shared >= 1:  # every option's tokens start with these prompt tokens
        prefix = tuple(full_ids[0][:shared])
        suffixes = [(tuple(ids[shared:]), n) for ids, n in zip(full_ids, owned, strict=True)]
    elif start_id is not None:  # nothing predicts an option's first token: start from BOS/EOS
        prefix = (start_id,)
        suffixes = [(tuple(ids), n) for ids, n in zip(full_ids, owned, strict=True)]
    else:
        raise ValueError(
            "no context token precedes a continuation (empty prompt, or merged into the "
            "continuation) and the tokenizer has neither a BOS nor an EOS token to start from"
        )
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
