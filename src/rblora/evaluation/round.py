"""One call per federated round: every multiple-choice suite plus the held-out loss.

The suites and loss records are the same every round, only the model changes: a run encodes them
once (`encode_evaluation`, which also finds an item the model cannot score before round 1) and
scores the encoded form each round (`evaluate_encoded`), so no round calls the tokenizer.
`evaluate_round` does both, for a caller that evaluates once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rblora.evaluation.config import DEFAULTS, EvalConfig
from rblora.evaluation.items import MCItem
from rblora.evaluation.loss import EncodedLoss, encode_loss, loss_of_encoded
from rblora.evaluation.multiple_choice import (
    EncodedSuite,
    context_size,
    encode_suite,
    mc_outcomes,
    score_encoded,
)

#: EvalConfig fields that decide the tokens (the others only how they are run).
ENCODING_FIELDS = ("strategy", "max_length", "cutoff_len", "add_eos")


@dataclass(frozen=True)
class EncodedEvaluation:
    """Suites and loss records tokenized once for a run (see `encode_evaluation`).

    suites: name -> encoded suite (empty suites left out); loss: None without loss records;
    encoding: the values of ``ENCODING_FIELDS`` they were encoded with.
    """

    suites: dict[str, EncodedSuite]
    loss: EncodedLoss | None
    encoding: tuple


def _encoding(config: EvalConfig) -> tuple:
    return tuple(getattr(config, name) for name in ENCODING_FIELDS)


def encode_evaluation(
    tokenizer,
    suites: Mapping[str, Sequence[MCItem]],
    loss_records: Sequence[dict] | None,
    prompter,
    config: EvalConfig = DEFAULTS,
    *,
    context: int | None = None,
) -> EncodedEvaluation:
    """Tokenize the suites and loss records once, as ``config`` says.

    context: the model's context size (`multiple_choice.context_size`), the longest row when
    ``config.max_length`` is None. Raises ValueError naming the suite and item, or the loss
    record, that cannot be scored, or if no loss record keeps a response token.
    """
    max_length = config.max_length if config.max_length is not None else context
    encoded = {}
    for name, items in suites.items():
        if not items:
            continue
        try:
            encoded[name] = encode_suite(tokenizer, items, config.strategy, max_length)
        except ValueError as err:
            raise ValueError(f"evaluation suite {name!r}: {err}") from err
    loss = None
    if loss_records:
        try:
            loss = encode_loss(tokenizer, loss_records, prompter, config.cutoff_len, config.add_eos)
        except ValueError as err:
            raise ValueError(f"held-out loss: {err}") from err
    return EncodedEvaluation(encoded, loss, _encoding(config))


def evaluate_encoded(
    model, encoded: EncodedEvaluation, config: EvalConfig = DEFAULTS, *, items: bool = False
) -> dict:
    """Evaluate the (global) model on an encoded evaluation; the dict of `evaluate_round`.

    ``config`` must have the encoding fields the evaluation was encoded with (ValueError
    otherwise); its other fields (batching, autocast, progress) apply here. ``items``: the dict
    also holds ``"items": {suite: outcomes}``, each question's id and whether ``accuracy`` and
    ``acc_norm`` got it right (`rblora.evaluation.outcomes`).
    """
    if _encoding(config) != encoded.encoding:
        asked = dict(zip(ENCODING_FIELDS, _encoding(config), strict=True))
        held = dict(zip(ENCODING_FIELDS, encoded.encoding, strict=True))
        raise ValueError(f"evaluation encoded with {held}, asked to run with {asked}")
    start = time.perf_counter()
    common = {
        "batch_tokens": config.batch_tokens,
        "batch_size": config.batch_size,
        "autocast_bf16": config.autocast_bf16,
        "progress": config.progress,
    }
    out: dict = {"suites": {}}
    outcomes = {}
    for name, suite in encoded.suites.items():
        result = score_encoded(model, suite, **common)
        out["suites"][name] = result.to_dict()
        if items:
            outcomes[name] = mc_outcomes(suite.items, result)
    if items:
        out["items"] = outcomes
    if encoded.loss is not None:
        loss = loss_of_encoded(model, encoded.loss, **common)
        out.update(
            loss=loss["loss"],
            perplexity=loss["perplexity"],
            loss_tokens=loss["tokens"],
            loss_seconds=loss["seconds"],
        )
    out["seconds"] = time.perf_counter() - start
    return out


def evaluate_round(
    model,
    tokenizer,
    suites: Mapping[str, Sequence[MCItem]],
    loss_records: Sequence[dict] | None,
    prompter,
    config: EvalConfig = DEFAULTS,
) -> dict:
    """Evaluate the (global) model; returns a JSON-serialisable dict for metrics.jsonl::

        {"suites": {name: {"count", "accuracy", "acc_norm", "macro_accuracy", "macro_acc_norm",
                           "per_subject": {subject: {"count", "accuracy", "acc_norm"}},
                           "seconds"}},
         "loss": float, "perplexity": float, "loss_tokens": int, "loss_seconds": float,
         "seconds": float}

    Loss fields are present only when ``loss_records`` is non-empty. Empty suites are skipped.
    Tokenizes on every call: a run that evaluates every round encodes once
    (`encode_evaluation`) and calls `evaluate_encoded`.
    """
    start = time.perf_counter()
    encoded = encode_evaluation(
        tokenizer, suites, loss_records, prompter, config, context=context_size(model)
    )
    out = evaluate_encoded(model, encoded, config)
    out["seconds"] = time.perf_counter() - start  # the tokenization included
    return out
