"""Federated partitioners: pure numpy; every random draw comes from an explicit Generator.

Each partitioner returns one index array per client (``list[np.ndarray]``, dtype int64) into a
pool of ``n`` examples. The arrays are disjoint; ``iid``, ``dirichlet`` and ``shards`` cover the
whole pool, ``sizes`` covers the first ``sum(sizes)`` positions of a random permutation.
``labels`` is an integer array ``(n,)`` of category codes (Dolly category, task name or image
class).

The Dirichlet split follows the usual label-skew protocol (Hsu et al. 2019; used by FedLab and
NIID-Bench and by the seed): for every category draw client shares ``p ~ Dir(alpha * 1_K)``,
give no more of it to clients that already hold ``n / K`` examples, split the category's shuffled
examples at the cumulative shares, and redraw everything until every client holds ``min_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Per-client sizes of the seed (RB-LoRA) for 10 clients; 14,800 examples in total.
SEED_CLIENT_SIZES: tuple[int, ...] = (500, 500, 1000, 1000, 1500, 1500, 1900, 1900, 2500, 2500)

#: Redraws of the Dirichlet split before giving up on ``min_size``.
DIRICHLET_MAX_DRAWS = 1000


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"number of clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(
            f"{num_clients} clients but only {n} training examples: every client needs at least "
            f"one; use at most {n} clients"
        )


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def partition_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``num_clients`` parts whose sizes differ by <= 1."""
    _check_clients(n, num_clients)
    return [part.astype(np.int64) for part in np.array_split(rng.permutation(n), num_clients)]


def partition_sizes(n: int, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Client ``k`` gets the next ``sizes[k]`` indices of a random permutation of ``range(n)``."""
    sizes = [int(s) for s in sizes]
    _check_clients(n, len(sizes))
    bad = [s for s in sizes if s < 1]
    if bad:
        raise ValueError(f"client sizes must be positive, got {sizes}")
    if sum(sizes) > n:
        raise ValueError(
            f"client sizes sum to {sum(sizes)} but only {n} training examples are available; "
            f"give sizes summing to at most {n}"
        )
    perm = rng.permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [perm[a:b].astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def partition_shards(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """The pathological split: sort by category, cut into ``K * shards_per_client`` contiguous
    shards, deal the shards out at random (``shards_per_client`` each).

    Examples are shuffled inside their category first, so which examples of a category land in a
    shard is random too. Shard sizes differ by at most one.
    """
    labels = _as_labels(labels)
    n = labels.size
    _check_clients(n, num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be at least 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards but only "
            f"{n} examples; use at most {n // shards_per_client} clients"
        )
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]).astype(np.int64) for row in dealt]


def partition_dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_draws: int = DIRICHLET_MAX_DRAWS,
) -> list[np.ndarray]:
    """Label-skewed split: per category, client shares ~ ``Dir(alpha)`` (smaller alpha, more skew).

    Redraws until every client holds at least ``min_size`` examples; raises ``ValueError`` after
    ``max_draws`` attempts (lower ``min_size`` or raise ``alpha``).
    """
    labels = _as_labels(labels)
    n = labels.size
    _check_clients(n, num_clients)
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * num_clients > n:
        raise ValueError(
            f"min_size {min_size} x {num_clients} clients exceeds the {n} examples; "
            f"use a min_size between 0 and {n // num_clients}"
        )
    categories = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in categories]
    cap = n / num_clients
    smallest = 0
    for _ in range(max_draws):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        counts = np.zeros(num_clients, dtype=np.int64)
        for idx in members:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            open_ = counts < cap
            if open_.any():  # all clients full only when the pool is exhausted
                shares = shares * open_
            total = shares.sum()
            shares = shares / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
                counts[k] += piece.size
        smallest = int(counts.min())
        if smallest >= min_size:
            return [np.concatenate(p).astype(np.int64) for p in parts]
    raise ValueError(
        f"Dirichlet split (alpha={alpha}) never gave every one of {num_clients} clients "
        f"min_size={min_size} examples in {max_draws} draws (smallest client: {smallest}); "
        "lower --min_size or raise --alpha"
    )


def stratified_sample(
    labels: Sequence[int] | np.ndarray,
    per_category: Sequence[int] | np.ndarray,
    rng: np.random.Generator,
    names: Sequence[str] | None = None,
    keep_one: bool = False,
) -> np.ndarray:
    """Draw ``per_category[c]`` indices of every category ``c`` without replacement.

    ``per_category`` has shape ``(C,)``, ``C`` the number of category codes. With
    ``keep_one=False`` a category with fewer examples gives all it has; with ``keep_one=True``
    (carving a test set out of the training pool) every category must keep at least one example
    back, else ``ValueError`` naming the category (``names[c]`` when given). Returns the chosen
    indices grouped by category, shape ``(sum,)``.
    """
    labels = _as_labels(labels)
    chosen = []
    for c, want in enumerate(np.asarray(per_category, dtype=np.int64)):
        idx = np.flatnonzero(labels == c)
        if keep_one and want > 0 and idx.size <= want:
            name = names[c] if names is not None else c
            raise ValueError(
                f"category {name!r} has {idx.size} examples, not enough to hold out {want} for "
                f"global_test and keep some for training; use --test_per_category below {idx.size}"
            )
        chosen.append(rng.choice(idx, size=min(int(want), idx.size), replace=False))
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def default_client_sizes(num_clients: int, available: int) -> tuple[list[int], str]:
    """The seed's per-client sizes, scaled to ``num_clients`` and to the data available.

    Rule: client ``k`` of ``K`` takes ``SEED_CLIENT_SIZES[floor(10 k / K)]`` (for K = 10 exactly
    the seed's list; K = 5 gives 500, 1000, 1500, 1900, 2500; K = 20 repeats each size twice). If
    those sizes sum to more than ``available``, all are multiplied by ``available / sum`` and
    floored (each at least 1). Returns the sizes and a one-line note describing what was done.
    """
    _check_clients(available, num_clients)
    ref = len(SEED_CLIENT_SIZES)
    sizes = [SEED_CLIENT_SIZES[(k * ref) // num_clients] for k in range(num_clients)]
    note = "seed sizes" if num_clients == ref else f"seed sizes resampled to {num_clients} clients"
    total = sum(sizes)
    if total > available:
        scale = available / total
        sizes = [max(1, int(s * scale)) for s in sizes]
        note += f", scaled by {scale:.4f} to fit the {available} training examples"
    return sizes, note


def category_histogram(
    parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray, num_categories: int
) -> np.ndarray:
    """Counts ``(K, C)``: entry ``[k, c]`` is how many of client ``k``'s examples have label c."""
    labels = _as_labels(labels)
    return np.stack([np.bincount(labels[p], minlength=num_categories) for p in parts]).astype(
        np.int64
    )


def category_entropy(histogram: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of a ``(K, C)`` count matrix; shape ``(K,)``.

    0 for a client holding a single category, ``log2(C)`` for a uniform mix.
    """
    counts = np.asarray(histogram, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return 0.0 - (p * logs).sum(axis=1)  # 0.0 - x turns -0.0 into 0.0
