"""Zero-shot multiple-choice accuracy by the log-likelihood of each option's continuation.

Only the part in which the options differ is scored: text shared by every option up to its last
word boundary (e.g. the lead ``"The answer is:"`` of ``"The answer is: A. <x>"``) is moved into
the context (see `scored_parts`), as lm-evaluation-harness keeps shared text in the context. The
score of an option is the sum of the log-probabilities of its remaining continuation tokens
(``" A. <x>"``; see `encoding` for which tokens those are). ``accuracy`` picks the option with the
highest sum; ``acc_norm`` divides each sum by that continuation's length in characters first (as
lm-evaluation-harness's acc_norm), which removes the bias towards short options. Macro averages
weight every subject equally.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rblora.evaluation.config import DEFAULTS, STRATEGIES
from rblora.evaluation.encoding import (
    Row,
    Segment,
    encode_texts,
    split_continuations,
    start_token_id,
)
from rblora.evaluation.forward import sum_logprobs
from rblora.evaluation.items import MCItem
from rblora.evaluation.outcomes import mc_item_ids, suite_outcomes


@dataclass(frozen=True)
class SubjectScore:
    count: int
    accuracy: float
    acc_norm: float


@dataclass
class MCResult:
    """Scores of one suite.

    loglikelihoods[i][j]: summed log-prob of item i's option j, over its scored continuation
    (``scored_parts``: without the text all options share).
    """

    count: int
    accuracy: float
    acc_norm: float
    macro_accuracy: float
    macro_acc_norm: float
    per_subject: dict[str, SubjectScore]
    loglikelihoods: list[list[float]] = field(repr=False)
    predictions: list[int] = field(repr=False)
    predictions_norm: list[int] = field(repr=False)
    seconds: float = 0.0

    def to_dict(self, per_item: bool = False) -> dict:
        """JSON-serialisable summary (per-item log-likelihoods only if asked)."""
        out = {
            "count": self.count,
            "accuracy": self.accuracy,
            "acc_norm": self.acc_norm,
            "macro_accuracy": self.macro_accuracy,
            "macro_acc_norm": self.macro_acc_norm,
            "per_subject": {
                s: {"count": v.count, "accuracy": v.accuracy, "acc_norm": v.acc_norm}
                for s, v in self.per_subject.items()
            },
            "seconds": self.seconds,
        }
        if per_item:
            out["loglikelihoods"] = self.loglikelihoods
            out["predictions"] = self.predictions
        return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))  # first of ties


def scored_parts(item: MCItem) -> tuple[str, list[str]]:
    """The context and the continuations that are scored: ``(prompt + shared lead, rests)``.

    The options' longest common prefix is cut before its last whitespace character: the text
    before it is the same for every option, so it joins the context (it would add one constant to
    every score and, divided by different lengths, bias acc_norm); the whitespace stays with the
    continuation, where BPE tokenizers attach it to the next word (``"... The answer is:"`` +
    ``" A. x"``, ``" B. y"``). A common prefix without whitespace after its first character (a
    shared leading space, a shared word start) moves nothing.
    """
    shared = os.path.commonprefix(item.choices)
    cut = max((k for k, ch in enumerate(shared) if ch.isspace()), default=0)
    return item.prompt + shared[:cut], [c[cut:] for c in item.choices]


def summarize(items: Sequence[MCItem], lls: list[list[float]], seconds: float = 0.0) -> MCResult:
    """Accuracies from per-option log-likelihoods (``lls[i][j]`` for item i, option j).

    acc_norm divides ``lls[i][j]`` by the length in characters of the scored continuation
    (``scored_parts``), not of the whole option text.
    """
    pred = [_argmax(ll) for ll in lls]
    pred_norm = [
        _argmax([v / len(c) for v, c in zip(ll, scored_parts(it)[1], strict=True)])
        for ll, it in zip(lls, items, strict=True)
    ]
    hits = [p == it.answer for p, it in zip(pred, items, strict=True)]
    hits_norm = [p == it.answer for p, it in zip(pred_norm, items, strict=True)]
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.subject, []).append(i)
    per_subject = {
        s: SubjectScore(
            len(idx),
            sum(hits[i] for i in idx) / len(idx),
            sum(hits_norm[i] for i in idx) / len(idx),
        )
        for s, idx in sorted(groups.items())
    }
    n = len(items)
    return MCResult(
        count=n,
        accuracy=sum(hits) / n,
        acc_norm=sum(hits_norm) / n,
        macro_accuracy=sum(v.accuracy for v in per_subject.values()) / len(per_subject),
        macro_acc_norm=sum(v.acc_norm for v in per_subject.values()) / len(per_subject),
        per_subject=per_subject,
        loglikelihoods=lls,
        predictions=pred,
        predictions_norm=pred_norm,
        seconds=seconds,
    )


def mc_outcomes(items: Sequence[MCItem], result: MCResult) -> dict:
    """Each item's id and whether ``accuracy`` and ``acc_norm`` got it right
    (`rblora.evaluation.outcomes`)."""
    answers = [it.answer for it in items]
    return suite_outcomes(
        mc_item_ids(items),
        accuracy=[p == a for p, a in zip(result.predictions, answers, strict=True)],
        acc_norm=[p == a for p, a in zip(result.predictions_norm, answers, strict=True)],
    )


def context_size(model) -> int | None:
    """The model's maximum number of positions, if its config states one."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def pad_token_id(tokenizer) -> int:
    """Any valid id to fill padding with (it is masked out)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@dataclass(frozen=True)
class EncodedSuite:
    """A suite tokenized once: everything `score_encoded` needs, so scoring it again (every
    round) calls no tokenizer.

    rows: the sequences the model reads; slots[k]: the (item, option) whose log-likelihood slot k
    sums; pad_id: the id padding is filled with (masked out).
    """

    items: tuple[MCItem, ...]
    rows: tuple[Row, ...]
    slots: tuple[tuple[int, int], ...]
    pad_id: int


def encode_suite(
    tokenizer, items: Sequence[MCItem], strategy: str, max_length: int | None
) -> EncodedSuite:
    """Tokenize ``items`` for scoring. packed: a row per item; flat: a row per option.

    Each item is tokenized as ``scored_parts`` splits it: the context, then context + each
    continuation. ``max_length``: longest row in tokens (the prompt is cut from the left), None
    for no limit. Raises ValueError naming the item that cannot be scored.
    """
    if not items:
        raise ValueError("no items to score")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    texts = []
    for it in items:
        context, continuations = scored_parts(it)
        texts.append(context)
        texts.extend(context + c for c in continuations)
    ids = encode_texts(tokenizer, texts)
    start_id = start_token_id(tokenizer)
    rows, slots = [], []
    at = 0
    for i, it in enumerate(items):
        prompt_ids, full = ids[at], ids[at + 1 : at + 1 + len(it.choices)]
        at += 1 + len(it.choices)
        try:
            prefix, suffixes = split_continuations(prompt_ids, full, max_length, start_id=start_id)
        except ValueError as err:
            raise ValueError(f"item {i} ({it.subject!r}): {err}") from err
        segments = []
        for j, (tokens, n_scored) in enumerate(suffixes):
            segments.append(Segment(tokens, n_scored, len(slots)))
            slots.append((i, j))
        if strategy == "packed":
            rows.append(Row(prefix, tuple(segments)))
        else:
            rows.extend(Row(prefix, (s,)) for s in segments)
    return EncodedSuite(tuple(items), tuple(rows), tuple(slots), pad_token_id(tokenizer))


def score_encoded(
    model,
    suite: EncodedSuite,
    *,
    batch_tokens: int = DEFAULTS.batch_tokens,
    batch_size: int = DEFAULTS.batch_size,
    autocast_bf16: bool = DEFAULTS.autocast_bf16,
    progress: bool = DEFAULTS.progress,
) -> MCResult:
    """Score an encoded suite with a causal LM, no gradients (see `score_multiple_choice`)."""
    start = time.perf_counter()
    totals = sum_logprobs(
        model,
        suite.rows,
        len(suite.slots),
        pad_id=suite.pad_id,
        batch_tokens=batch_tokens,
        batch_size=batch_size,
        autocast_bf16=autocast_bf16,
        progress=progress,
        desc="multiple choice",
    )
    lls = [[math.nan] * len(it.choices) for it in suite.items]
    for (i, j), value in zip(suite.slots, totals.tolist(), strict=True):
        lls[i][j] = value
    return summarize(suite.items, lls, time.perf_counter() - start)


def score_multiple_choice(
    model,
    tokenizer,
    items: Sequence[MCItem],
    *,
    batch_tokens: int = DEFAULTS.batch_tokens,
    batch_size: int = DEFAULTS.batch_size,
    strategy: str = DEFAULTS.strategy,
    max_length: int | None = DEFAULTS.max_length,
    autocast_bf16: bool = DEFAULTS.autocast_bf16,
    progress: bool = DEFAULTS.progress,
) -> MCResult:
    """Score ``items`` with a causal LM (``model(input_ids, ...)`` -> ``.logits``), no gradients.

    Tokenizes then scores (`encode_suite`, `score_encoded`): for a suite scored once; a suite
    scored every round is encoded once and passed to `score_encoded`. The model is put in eval
    mode for the call and its previous mode restored. ``max_length`` defaults to the model's
    context size (``config.max_position_embeddings``). ``seconds`` includes the tokenization.
    """
    start = time.perf_counter()
    if max_length is None:
        max_length = context_size(model)
    suite = encode_suite(tokenizer, items, strategy, max_length)
    result = score_encoded(
        model,
        suite,
        batch_tokens=batch_tokens,
        batch_size=batch_size,
        autocast_bf16=autocast_bf16,
        progress=progress,
    )
    result.seconds = time.perf_counter() - start
    return result
