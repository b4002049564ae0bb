"""Paired comparison of two models scored on the same items: difference, interval, test.

Every method of a comparison is scored on the same questions (or images) within a replicate (a
training seed, or a pair of data seed and training seed), so two methods are compared item by
item: ``x[i], y[i]`` in {0, 1} are whether method X and the reference Y got item i right, and
``d[i] = x[i] - y[i]`` in {-1, 0, 1}. The difference of accuracies is ``mean(d)``; over several
replicates it is the mean over replicates of each replicate's ``mean(d)`` (each replicate weighs
the same, whatever its number of items).

- **Interval**: 95% percentile interval of a seeded paired bootstrap. One replicate: the items
  are resampled with replacement (each draw keeps an item's pair together). Several replicates:
  hierarchical, the replicates are resampled with replacement, then the items within each drawn
  replicate (a replicate drawn twice gets two independent item resamples), so the interval holds
  both the variation between seeds and the sampling of items. With few replicates (2 or 3) the
  resampling of replicates is coarse: read the interval as a rough one.
  Drawing ``n`` items with replacement and averaging their ``d`` depends only on how many of the
  draws are -1, 0 and +1, which is a multinomial draw with the replicate's proportions of the
  three values; that is how it is computed (exactly the same distribution, at the cost of one
  multinomial draw instead of ``n`` indices).
- **Test**: one replicate, McNemar's exact test: under "no difference" each discordant item
  (``b`` items X right and Y wrong, ``c`` the other way) is as likely either way, so
  ``min(b, c)`` is Binomial(b + c, 1/2) and the two-sided p-value is
  ``min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))`` (1 when b + c = 0), computed in
  exact integers. Several replicates: the bootstrap's two-sided p-value
  ``min(1, 2 * min(P*(D <= 0), P*(D >= 0)))`` with ``P*(.) = (1 + count) / (B + 1)`` over the
  ``B`` bootstrap differences ``D``: the smallest level at which the percentile interval would
  exclude 0.

Items are matched by id (``rblora.evaluation.outcomes``); two outcome lists over different items
are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Bootstrap draws and seed of the comparison tables (seeded: a table rebuilt is the same table).
BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` and ``c`` discordant pairs (see the module doc)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int: exact until the one final rounding


def match_items(x: dict, y: dict, measure: str, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(x_outcomes, y_outcomes)`` of ``measure`` in the order of ``x``'s ids, from two suites'
    outcomes ``{"ids": [...], measure: [0 | 1, ...]}``. ValueError (naming ``what``) when the two
    were scored on different items or lack the measure."""
    for side, data in (("first", x), ("second", y)):
        if measure not in data:
            raise ValueError(f"{what}: the {side} outcomes have no {measure!r}")
        if len(data[measure]) != len(data["ids"]):
            raise ValueError(f"{what}: {len(data[measure])} outcomes for {len(data['ids'])} items")
    where = {item: k for k, item in enumerate(y["ids"])}
    if len(where) != len(y["ids"]) or len(set(x["ids"])) != len(x["ids"]):
        raise ValueError(f"{what}: an item id appears twice")
    if set(where) != set(x["ids"]):
        only_x = len(set(x["ids"]) - set(where))
        only_y = len(set(where) - set(x["ids"]))
        raise ValueError(
            f"{what}: scored on different items ({len(x['ids'])} and {len(y['ids'])} items, "
            f"{only_x} only in the first, {only_y} only in the second), so they cannot be "
            "compared item by item"
        )
    order = [where[item] for item in x["ids"]]
    xs = np.asarray(x[measure], dtype=np.int64)
    ys = np.asarray(y[measure], dtype=np.int64)[order]
    return xs, ys


def bootstrap_differences(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], draws: int, seed: int
) -> np.ndarray:
    """``draws`` bootstrap values of the paired difference over ``pairs`` (one ``(x, y)`` of
    matched 0/1 outcomes per replicate), hierarchical when there are several (module doc)."""
    if not pairs:
        raise ValueError("no replicate to resample")
    rng = np.random.default_rng(seed)
    # per replicate: its number of items and the proportions of d = -1, 0, +1
    sizes, probs = [], []
    for x, y in pairs:
        d = x - y
        if d.size == 0:
            raise ValueError("a replicate without items")
        sizes.append(d.size)
        probs.append([np.mean(d == -1), np.mean(d == 0), np.mean(d == 1)])
    r = len(pairs)
    chosen = rng.integers(0, r, size=(draws, r)) if r > 1 else np.zeros((draws, 1), dtype=int)
    total = np.zeros(draws)
    for slot in range(chosen.shape[1]):
        for k in range(r):
            rows = np.flatnonzero(chosen[:, slot] == k)
            if rows.size:
                counts = rng.multinomial(sizes[k], probs[k], size=rows.size)
                total[rows] += (counts[:, 2] - counts[:, 0]) / sizes[k]
    return total / chosen.shape[1]


@dataclass(frozen=True)
class PairedResult:
    """X minus the reference Y over the replicates both have.

    difference: mean over replicates of (accuracy of X - accuracy of Y) on their common items;
    low, high: its 95% bootstrap interval; p: the test's two-sided p-value; test: ``McNemar
    exact`` (one replicate) or ``bootstrap`` (several); b, c: discordant items summed over
    replicates (X right and Y wrong; X wrong and Y right); items: items summed over replicates.
    """

    difference: float
    low: float
    high: float
    p: float
    test: str
    replicates: int
    items: int
    b: int
    c: int

    def to_dict(self) -> dict:
        return asdict(self)

    def reading(self) -> str:
        """What the interval resolves, and no more."""
        if self.low > 0:
            return "above the reference (interval above 0)"
        if self.high < 0:
            return "below the reference (interval below 0)"
        return "not resolved (interval contains 0)"


def paired_difference(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
) -> PairedResult:
    """Difference, 95% interval and p-value of X against Y over ``pairs``, one ``(x, y)`` of
    matched 0/1 outcomes per replicate (:func:`match_items`)."""
    diffs = [float(np.mean(x - y)) for x, y in pairs]
    b = sum(int(np.sum((x == 1) & (y == 0))) for x, y in pairs)
    c = sum(int(np.sum((x == 0) & (y == 1))) for x, y in pairs)
    boot = bootstrap_differences(pairs, draws, seed)
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    if len(pairs) == 1:
        p, test = mcnemar_exact(b, c), "McNemar exact"
    else:
        below = (1 + np.sum(boot <= 0)) / (draws + 1)
        above = (1 + np.sum(boot >= 0)) / (draws + 1)
        p, test = float(min(1.0, 2 * min(below, above))), "bootstrap"
    return PairedResult(
        difference=float(np.mean(diffs)),
        low=float(low),
        high=float(high),
        p=p,
        test=test,
        replicates=len(pairs),
        items=sum(len(x) for x, _ in pairs),
        b=b,
        c=c,
    )
