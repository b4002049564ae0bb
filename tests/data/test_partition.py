"""Partitioners: disjointness, coverage, sizes, determinism, Dirichlet skew; helpers by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rblora.data import partition as P


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def labels_of(per_category: list[int]) -> np.ndarray:
    """Category codes 0..C-1, ``per_category[c]`` of each, interleaved (not sorted)."""
    codes = np.concatenate([np.full(n, c) for c, n in enumerate(per_category)])
    return np.random.default_rng(123).permutation(codes)


def assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size, "a pool index went to two clients"
    return joined


def test_iid_covers_pool_disjoint_balanced_and_is_deterministic():
    parts = P.partition_iid(103, 10, rng(1))
    joined = assert_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert sorted(p.size for p in parts) == [10] * 7 + [11] * 3  # 103 = 7 * 10 + 3 * 11
    again = P.partition_iid(103, 10, rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = P.partition_iid(103, 10, rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_sizes_exact_disjoint_deterministic():
    sizes = [5, 1, 7, 3]
    parts = P.partition_sizes(20, sizes, rng(3))
    assert [p.size for p in parts] == sizes
    joined = assert_disjoint(parts)
    assert joined.min() >= 0 and joined.max() < 20
    again = P.partition_sizes(20, sizes, rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # the full pool when the sizes add up to it
    full = P.partition_sizes(16, sizes, rng(0))
    assert sorted(np.concatenate(full).tolist()) == list(range(16))


@pytest.mark.parametrize(
    ("n", "sizes", "message"),
    [
        (20, [10, 11], "sum to 21 but only 20"),
        (20, [5, 0], "must be positive"),
        (2, [1, 1, 1], "3 clients but only 2"),
        (5, [], "at least 1"),
    ],
)
def test_sizes_bad_input(n, sizes, message):
    with pytest.raises(ValueError, match=message):
        P.partition_sizes(n, sizes, rng())


def test_shards_two_categories_per_client_when_shards_align():
    # 10 categories x 20 examples, 5 clients x 2 shards of 20: every shard is one category.
    labels = labels_of([20] * 10)
    parts = P.partition_shards(labels, 5, rng(4))
    joined = assert_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(200))
    assert [p.size for p in parts] == [40] * 5
    hist = P.category_histogram(parts, labels, 10)
    assert (hist > 0).sum(axis=1).tolist() == [2] * 5  # exactly two categories each
    assert sorted(hist[hist > 0].tolist()) == [20] * 10
    again = P.partition_shards(labels, 5, rng(4))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = P.partition_shards(labels, 5, rng(5))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_shards_uneven_sizes_and_too_many_clients():
    labels = labels_of([7, 5, 9])  # 21 examples, 3 clients x 2 shards: sizes 4,4,4,3,3,3
    parts = P.partition_shards(labels, 3, rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(21))
    assert sum(p.size for p in parts) == 21 and all(6 <= p.size <= 8 for p in parts)
    with pytest.raises(ValueError, match="at most 10 clients"):
        P.partition_shards(labels, 11, rng(0))


def test_dirichlet_covers_pool_respects_min_size_and_is_deterministic():
    labels = labels_of([60, 40, 80, 20, 50])
    parts = P.partition_dirichlet(labels, 6, 0.5, rng(7), min_size=10)
    joined = assert_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(250))
    assert min(p.size for p in parts) >= 10
    again = P.partition_dirichlet(labels, 6, 0.5, rng(7), min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def mean_entropy(alpha: float, seeds=range(5)) -> float:
    labels = labels_of([100] * 10)
    values = []
    for s in seeds:
        parts = P.partition_dirichlet(labels, 10, alpha, rng(s), min_size=5)
        values.append(P.category_entropy(P.category_histogram(parts, labels, 10)).mean())
    return float(np.mean(values))


def test_dirichlet_smaller_alpha_gives_more_skew():
    low, mid, high = mean_entropy(0.1), mean_entropy(1.0), mean_entropy(100.0)
    # log2(10) = 3.32 bits is a uniform mix; measured here about 1.3, 2.7 and 3.3 bits
    assert low < mid - 0.5 < high - 1.0
    assert high > 3.2


def test_dirichlet_bad_input():
    labels = labels_of([10, 10])
    with pytest.raises(ValueError, match="alpha must be positive"):
        P.partition_dirichlet(labels, 2, 0.0, rng())
    with pytest.raises(ValueError, match="use a min_size between 0 and 10"):
        P.partition_dirichlet(labels, 2, 0.5, rng(), min_size=11)
    with pytest.raises(ValueError, match="max_draws must be at least 1, got 0"):
        P.partition_dirichlet(labels, 2, 0.5, rng(), max_draws=0)
    with pytest.raises(ValueError, match="1-D integer"):
        P.partition_dirichlet(np.array([0.5, 1.5]), 2, 0.5, rng())


def test_default_client_sizes_rule():
    seed = [500, 500, 1000, 1000, 1500, 1500, 1900, 1900, 2500, 2500]
    assert P.default_client_sizes(10, 20000)[0] == seed
    assert P.default_client_sizes(5, 20000)[0] == [500, 1000, 1500, 1900, 2500]
    assert P.default_client_sizes(20, 40000)[0] == [s for s in seed for _ in (0, 1)]
    assert P.default_client_sizes(3, 20000)[0] == [500, 1000, 1900]  # floor(10k/3) = 0, 3, 6
    scaled, note = P.default_client_sizes(10, 1480)  # 14,800 -> 1,480: a tenth of each
    assert scaled == [50, 50, 100, 100, 150, 150, 190, 190, 250, 250]
    assert "scaled by 0.1000" in note
    with pytest.raises(ValueError, match="11 clients but only 10"):
        P.default_client_sizes(11, 10)


def test_stratified_sample_counts_and_keep_one():
    labels = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    idx = P.stratified_sample(labels, [1, 2, 5], rng(0))
    assert np.bincount(labels[idx], minlength=3).tolist() == [1, 2, 3]  # category 2 has 3
    assert np.unique(idx).size == idx.size
    with pytest.raises(ValueError, match="category 'c' has 3 examples"):
        P.stratified_sample(labels, [1, 1, 3], rng(0), names=["a", "b", "c"], keep_one=True)


def test_histogram_and_entropy_by_hand():
    labels = np.array([0, 0, 1, 2, 1])
    hist = P.category_histogram([np.array([0, 2]), np.array([1, 3, 4])], labels, 3)
    assert hist.tolist() == [[1, 1, 0], [1, 1, 1]]
    ent = P.category_entropy(np.array([[1, 1, 0], [2, 0, 0], [1, 1, 2], [0, 0, 0]]))
    np.testing.assert_allclose(ent, [1.0, 0.0, 1.5, 0.0])  # 1.5 = 2 * 1/4 * 2 + 1/2 * 1
    assert not np.signbit(ent).any()


def test_dirichlet_tops_up_the_closest_draw_when_no_draw_fits():
    # one category, tiny alpha, min_size = n / K: only an exact halving would do, and 5 draws
    # never give one; the closest is kept and the short client takes what it lacks
    split = P.dirichlet_split(np.zeros(100, dtype=int), 2, 0.01, rng(), 50, max_draws=5)
    assert [p.size for p in split.parts] == [50, 50]
    assert sorted(np.concatenate(split.parts).tolist()) == list(range(100))
    assert split.draws == 5 and 1 <= split.kept_draw <= 5 and split.short_clients == 1
    assert split.moved > 0
    # the top-up changes only what it must: the kept draw replayed, with 0 as the minimum
    replay = rng()
    for _ in range(split.kept_draw - 1):
        P.dirichlet_split(np.zeros(100, dtype=int), 2, 0.01, replay, 0, max_draws=1)
    drawn = P.dirichlet_split(np.zeros(100, dtype=int), 2, 0.01, replay, 0, max_draws=1).parts
    short = int(np.argmin([p.size for p in drawn]))
    assert set(drawn[short].tolist()) <= set(split.parts[short].tolist())
    assert set(split.parts[1 - short].tolist()) <= set(drawn[1 - short].tolist())
    assert split.moved == 50 - drawn[short].size


def test_dirichlet_many_clients_keeps_label_skew_and_size_shape():
    """1,000 clients of 10 categories x 300 (3 each on average), minimum 2: no draw fits, the
    closest is topped up; donors lose in proportion to their size, so the largest clients stay
    large, and the label skew of the draw stays."""
    labels = labels_of([300] * 10)
    free = P.dirichlet_split(labels, 1000, 0.5, rng(3), 0)
    split = P.dirichlet_split(labels, 1000, 0.5, rng(3), 2)
    sizes = np.array([p.size for p in split.parts])
    assert sizes.min() == 2 and sizes.sum() == 3000 and split.moved > 0
    assert split.draws == P.DIRICHLET_MAX_DRAWS  # 10,000 shares a draw: within the budget
    assert sizes.max() >= max(p.size for p in free.parts) - 2
    assert split.moved < 0.1 * labels.size
    entropy = P.category_entropy(P.category_histogram(split.parts, labels, 10)).mean()
    free_entropy = P.category_entropy(P.category_histogram(free.parts, labels, 10)).mean()
    assert abs(entropy - free_entropy) < 0.15 and entropy < 1.5  # log2(10) = 3.3 is no skew


def test_dirichlet_draw_budget_shrinks_with_many_clients():
    # 2,000 clients of 10 categories: 20,000 shares a draw, so 10 million allow 500 draws; a
    # minimum of the mean size (3) is never met by a draw, so all 500 are made
    split = P.dirichlet_split(labels_of([600] * 10), 2000, 0.5, rng(0), 3)
    assert split.draws == P.DIRICHLET_MAX_SHARES // 20_000 == 500
    assert min(p.size for p in split.parts) == 3
