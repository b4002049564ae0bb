"""Held-out loss: mean negative log-likelihood of the response tokens given their prompts."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rblora.evaluation.config import DEFAULTS
from rblora.evaluation.encoding import (
    Row,
    Segment,
    encode_texts,
    split_continuations,
    start_token_id,
)
from rblora.evaluation.forward import sum_logprobs
from rblora.evaluation.items import loss_pair
from rblora.evaluation.multiple_choice import pad_token_id
from rblora.utils.sequences import common_prefix, keep_response, leading_special_ids


@dataclass(frozen=True)
class EncodedLoss:
    """Held-out records tokenized once: everything `loss_of_encoded` needs (no tokenizer).

    rows: one per record that kept a response token, its response the one scored segment;
    pad_id: the id padding is filled with (masked out).
    """

    rows: tuple[Row, ...]
    pad_id: int


def encode_loss(
    tokenizer, records: Sequence[dict], prompter, cutoff_len: int, add_eos: bool
) -> EncodedLoss:
    """One row per record: prompt prefix, response segment (all of it scored).

    Tokens are ``prompt + response`` (+ EOS if ``add_eos``) cut to ``cutoff_len`` as in training:
    prompt tokens give way from the left (``rblora.utils.sequences.keep_response``), so every
    record keeps its response; a record whose response has no token of its own is skipped.
    Raises ValueError naming a bad record, or if no record keeps a response token.
    """
    prompts, fulls = [], []
    for i, rec in enumerate(records):
        try:
            instruction, context, response = loss_pair(rec)
        except (KeyError, ValueError) as err:
            raise ValueError(f"loss record {i}: {err}") from err
        prompts.append(prompter.prompt(instruction, context))
        fulls.append(prompter.full(instruction, context, response))
    ids = encode_texts(tokenizer, prompts + fulls) if prompts else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    start_id = start_token_id(tokenizer)
    n_lead = len(leading_special_ids(tokenizer))
    rows = []
    pairs = zip(ids[: len(prompts)], ids[len(prompts) :], strict=True)
    for i, (prompt_ids, full_ids) in enumerate(pairs):
        full_ids = full_ids + eos
        n_prompt = common_prefix(prompt_ids, full_ids)
        full_ids, n_prompt = keep_response(full_ids, n_prompt, n_lead, cutoff_len)
        if n_prompt >= len(full_ids):
            continue  # the response has no token of its own
        prompt_ids = full_ids[:n_prompt]
        try:
            prefix, [(tokens, n_scored)] = split_continuations(
                prompt_ids, [full_ids], None, start_id=start_id
            )
        except ValueError as err:
            raise ValueError(f"loss record {i}: {err}") from err
        rows.append(Row(prefix, (Segment(tokens, n_scored, len(rows)),)))
    if not rows:
        raise ValueError(
            f"no record has a response token within cutoff_len={cutoff_len}; raise cutoff_len"
        )
    return EncodedLoss(tuple(rows), pad_token_id(tokenizer))


def loss_of_encoded(
    model,
    encoded: EncodedLoss,
    *,
    batch_tokens: int = DEFAULTS.batch_tokens,
    batch_size: int = DEFAULTS.batch_size,
    autocast_bf16: bool = DEFAULTS.autocast_bf16,
    progress: bool = DEFAULTS.progress,
) -> dict:
    """`response_loss` of records encoded once (by `encode_loss`)."""
    start = time.perf_counter()
    rows = encoded.rows
    totals = sum_logprobs(
        model,
        rows,
        len(rows),
        pad_id=encoded.pad_id,
        batch_tokens=batch_tokens,
        batch_size=batch_size,
        autocast_bf16=autocast_bf16,
        progress=progress,
        desc="held-out loss",
    )
    tokens = sum(r.segments[0].n_scored for r in rows)
    loss = -float(totals.sum()) / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "records": len(rows),
        "seconds": time.perf_counter() - start,
    }


def response_loss(
    model,
    tokenizer,
    records: Sequence[dict],
    prompter,
    *,
    cutoff_len: int = DEFAULTS.cutoff_len,
    add_eos: bool = DEFAULTS.add_eos,
    batch_tokens: int = DEFAULTS.batch_tokens,
    batch_size: int = DEFAULTS.batch_size,
    autocast_bf16: bool = DEFAULTS.autocast_bf16,
    progress: bool = DEFAULTS.progress,
) -> dict:
    """``{"loss", "perplexity", "tokens", "records", "seconds"}`` over the response tokens.

    records: ``{instruction, context, response}`` (prepared) or ``{instruction, input, output}``
    (FLoRA) dicts. loss = total NLL / total response tokens (token-weighted mean, nats);
    perplexity = exp(loss). ``records`` counts the records that kept at least one response token.
    Tokenizes then scores (`encode_loss`, `loss_of_encoded`); records scored every round are
    encoded once instead. ``seconds`` includes the tokenization.
    """
    start = time.perf_counter()
    encoded = encode_loss(tokenizer, records, prompter, cutoff_len, add_eos)
    out = loss_of_encoded(
        model,
        encoded,
        batch_tokens=batch_tokens,
        batch_size=batch_size,
        autocast_bf16=autocast_bf16,
        progress=progress,
    )
    out["seconds"] = time.perf_counter() - start
    return out
