"""The paired statistics of comparison.md on fixed tables of item outcomes, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rblora.experiments.paired import (
    bootstrap_differences,
    match_items,
    mcnemar_exact,
    paired_difference,
)


def _table(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of X and Y: b items X right / Y wrong, c the other way, then concordant ones."""
    x = [1] * b + [0] * c + [1] * both + [0] * neither
    y = [0] * b + [1] * c + [1] * both + [0] * neither
    return np.array(x), np.array(y)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (7, 2, 92 / 512),  # 2 * (C(9,0) + C(9,1) + C(9,2)) / 2^9 = 2 * 46 / 512 = 0.1797
        (2, 7, 92 / 512),
        (5, 0, 2 / 32),  # 2 * C(5,0) / 2^5
        (10, 0, 2 / 1024),
        (1, 0, 1.0),  # 2 * 1/2
        (3, 3, 1.0),  # 2 * 42/64 > 1
        (0, 0, 1.0),  # no discordant item: nothing to test
        (12, 4, 2 * (1 + 16 + 120 + 560 + 1820) / 2**16),  # 0.0768
    ],
)
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_b7_c2_is_0_1797():
    assert round(mcnemar_exact(7, 2), 4) == 0.1797


def test_mcnemar_agrees_with_scipy_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for b in range(0, 25, 3):
        for c in range(0, 25, 4):
            if b + c:
                want = stats.binomtest(min(b, c), b + c, 0.5).pvalue
                assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 2)


def test_one_replicate_difference_and_mcnemar_on_a_fixed_table():
    x, y = _table(b=7, c=2, both=8, neither=3)  # 20 items: X 15/20, Y 10/20
    r = paired_difference([(x, y)])
    assert r.difference == pytest.approx(0.75 - 0.5)
    assert (r.b, r.c, r.items, r.replicates) == (7, 2, 20, 1)
    assert r.test == "McNemar exact" and r.p == pytest.approx(0.1796875)
    assert r.low < r.difference < r.high
    assert r.reading() == "not resolved (interval contains 0)"


def test_bootstrap_interval_matches_the_normal_approximation():
    # 200 items, b=20, c=10: d has mean 0.05 and per-item variance 30/200 - 0.05^2 = 0.1475;
    # the mean's sd is sqrt(0.1475 / 200) = 0.02716, so the 95% interval is about 0.05 +- 0.0532
    x, y = _table(b=20, c=10, both=100, neither=70)
    r = paired_difference([(x, y)])
    half = 1.96 * math.sqrt((30 / 200 - 0.05**2) / 200)
    assert r.low == pytest.approx(0.05 - half, abs=0.006)
    assert r.high == pytest.approx(0.05 + half, abs=0.006)


def test_bootstrap_of_counts_equals_resampling_the_items():
    # the multinomial of the counts of -1/0/+1 against drawing item indices directly
    x, y = _table(b=9, c=4, both=20, neither=17)
    d = x - y
    rng = np.random.default_rng(1)
    direct = d[rng.integers(0, d.size, size=(20_000, d.size))].mean(axis=1)
    ours = bootstrap_differences([(x, y)], 20_000, seed=2)
    assert ours.mean() == pytest.approx(direct.mean(), abs=0.003)
    assert ours.std() == pytest.approx(direct.std(), rel=0.03)
    assert np.quantile(ours, 0.025) == pytest.approx(np.quantile(direct, 0.025), abs=0.021)


def test_degenerate_tables_give_degenerate_intervals():
    same = (np.array([1, 0, 1, 1]), np.array([1, 0, 1, 1]))
    r = paired_difference([same])
    assert (r.difference, r.low, r.high, r.p) == (0.0, 0.0, 0.0, 1.0)
    better = (np.ones(5, dtype=int), np.zeros(5, dtype=int))
    r = paired_difference([better])
    assert (r.low, r.high) == (1.0, 1.0) and r.p == pytest.approx(2 / 32)
    assert r.reading() == "above the reference (interval above 0)"


def test_several_replicates_resample_replicates_then_items():
    # replicate 1: d = +0.1 on 2,000 items, replicate 2: d = +0.3; items alone would give
    # 0.2 +- 0.013; resampling the two replicates gives 0.1 (1/4), 0.2 (1/2) or 0.3 (1/4)
    r1 = _table(b=200, c=0, both=900, neither=900)
    r2 = _table(b=600, c=0, both=700, neither=700)
    r = paired_difference([r1, r2])
    assert r.difference == pytest.approx(0.2)
    assert r.test == "bootstrap" and r.replicates == 2 and r.items == 4000
    assert r.low < 0.11 and r.high > 0.29
    # every bootstrap difference is above 0: p = 2 * (1 + 0) / (B + 1)
    assert r.p == pytest.approx(2 / 10_001)


def test_bootstrap_p_value_of_several_replicates_without_a_difference():
    reps = [_table(b=5, c=5, both=10, neither=10), _table(b=3, c=3, both=12, neither=12)]
    r = paired_difference(reps)
    assert r.difference == 0.0 and r.p > 0.5 and r.low < 0 < r.high
    assert r.reading() == "not resolved (interval contains 0)"


def test_the_bootstrap_is_seeded():
    x, y = _table(b=9, c=4, both=20, neither=17)
    assert paired_difference([(x, y)]) == paired_difference([(x, y)])
    one, again = (bootstrap_differences([(x, y)], 500, seed=1) for _ in range(2))
    assert np.array_equal(one, again)
    assert not np.array_equal(one, bootstrap_differences([(x, y)], 500, seed=2))


def test_items_are_matched_by_id():
    x = {"ids": ["a", "b", "c"], "accuracy": [1, 0, 1]}
    y = {"ids": ["c", "a", "b"], "accuracy": [0, 1, 1]}  # a: 1, b: 1, c: 0
    xs, ys = match_items(x, y, "accuracy", "cells")
    assert xs.tolist() == [1, 0, 1] and ys.tolist() == [1, 1, 0]


def test_items_of_different_questions_are_refused():
    x = {"ids": ["a", "b", "c"], "accuracy": [1, 0, 1]}
    y = {"ids": ["a", "b", "d"], "accuracy": [1, 0, 1]}
    with pytest.raises(ValueError, match=r"RB-LoRA vs FLoRA seed 1: scored on different items"):
        match_items(x, y, "accuracy", "RB-LoRA vs FLoRA seed 1")
    with pytest.raises(ValueError, match="no 'acc_norm'"):
        match_items(x, x, "acc_norm", "cells")


def test_paired_rows_match_items_by_id_within_each_replicate():
    from rblora.experiments.differences import paired_rows

    def suite(ids, acc):
        return {"dev": {"ids": ids, "accuracy": acc}}

    # replicate A: X right on a, b; Y right on a only -> +1/3
    # replicate B (other items): X right on nothing; Y right on d -> -1/3; X's file lists the
    # items in another order than Y's
    ref = {1: {"A": suite(["a", "b", "c"], [1, 0, 0]), "B": suite(["d", "e", "f"], [1, 0, 0])}}
    x = {1: {"A": suite(["c", "a", "b"], [0, 1, 1]), "B": suite(["f", "e", "d"], [0, 0, 0])}}
    data = {"groups": {("s", "Y"): {"items": ref}, ("s", "X"): {"items": x}}}
    (row,) = paired_rows(data, ("s", "Y"), label=str)
    assert (row["method"], row["metric"], row["round"]) == ("X", "dev/accuracy", 1)
    assert row["difference"] == pytest.approx((1 / 3 - 1 / 3) / 2)
    assert (row["b"], row["c"], row["items"], row["replicates"]) == (1, 1, 6, ["A", "B"])
    assert row["test"] == "bootstrap" and row["low"] < 0 < row["high"]

    x[1]["B"] = suite(["f", "e", "g"], [0, 0, 0])  # B's cell of X was scored on other items
    with pytest.raises(ValueError, match=r"X \(s\) and Y \(s\), B, round 1, suite dev: scored"):
        paired_rows(data, ("s", "Y"), label=str)
