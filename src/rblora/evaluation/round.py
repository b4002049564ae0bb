"""One call per federated round: every multiple-choice suite plus the held-out loss."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from rblora.evaluation.config import DEFAULTS, EvalConfig
from rblora.evaluation.items import MCItem
from rblora.evaluation.loss import response_loss
from rblora.evaluation.multiple_choice import score_multiple_choice


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
    """
    start = time.perf_counter()
    common = {
        "batch_tokens": config.batch_tokens,
        "batch_size": config.batch_size,
        "autocast_bf16": config.autocast_bf16,
        "progress": config.progress,
    }
    out: dict = {"suites": {}}
    for name, items in suites.items():
        if not items:
            continue
        result = score_multiple_choice(
            model,
            tokenizer,
            items,
            strategy=config.strategy,
            max_length=config.max_length,
            **common,
        )
        out["suites"][name] = result.to_dict()
    if loss_records:
        loss = response_loss(
            model,
            tokenizer,
            loss_records,
            prompter,
            cutoff_len=config.cutoff_len,
            add_eos=config.add_eos,
            **common,
        )
        out.update(
            loss=loss["loss"],
            perplexity=loss["perplexity"],
            loss_tokens=loss["tokens"],
            loss_seconds=loss["seconds"],
        )
    out["seconds"] = time.perf_counter() - start
    return out
