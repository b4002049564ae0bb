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
With many clients for the pool (10,000 clients of Fashion-MNIST's 60,000 images, 6 each on
average) no draw ever gives every client ``min_size``, so after ``max_draws`` draws (a budget:
``DIRICHLET_MAX_DRAWS``, ``DIRICHLET_MAX_SHARES``) the one that came closest (the smallest total
shortfall) is kept and topped up: each short client, in id order, takes the examples it lacks
one at a time, of the category its own Dirichlet share favours most among those a donor still
holds, from the client holding that category that has so far kept the largest fraction of its
drawn size (the largest first; it must stay above ``min_size``). So donors lose in proportion
to their size and the shape of the size distribution is kept (:func:`dirichlet_split` reports
how many examples moved).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Per-client sizes of the seed (RB-LoRA) for 10 clients; 14,800 examples in total.
SEED_CLIENT_SIZES: tuple[int, ...] = (500, 500, 1000, 1000, 1500, 1500, 1900, 1900, 2500, 2500)

#: Draws of the Dirichlet split before the closest one is topped up to ``min_size``: at most
#: ``DIRICHLET_MAX_DRAWS``, and at most ``DIRICHLET_MAX_SHARES`` client shares drawn in all
#: (K x categories per draw): 1,000 draws up to 1,000 clients of 10 categories, 100 at 10,000
#: clients (a draw of 10,000 clients takes about 8 ms, and there no draw ever satisfies it).
DIRICHLET_MAX_DRAWS = 1000
DIRICHLET_MAX_SHARES = 10_000_000


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
    max_draws: int | None = None,
) -> list[np.ndarray]:
    """Label-skewed split: per category, client shares ~ ``Dir(alpha)`` (smaller alpha, more skew).

    Redraws until every client holds at least ``min_size`` examples; after ``max_draws`` draws
    (None: the budget of ``DIRICHLET_MAX_DRAWS`` and ``DIRICHLET_MAX_SHARES``) the closest draw
    is topped up (see the module doc and :func:`dirichlet_split`, which also says how many
    examples were moved).
    """
    return dirichlet_split(labels, num_clients, alpha, rng, min_size, max_draws).parts


@dataclass
class DirichletSplit:
    """A Dirichlet partition and how it was reached."""

    parts: list[np.ndarray]
    """One index array per client (as every partitioner returns)."""
    draws: int
    """Draws made (the last accepted, or all ``max_draws`` when the best one was topped up)."""
    kept_draw: int
    """1-based number of the draw the parts come from."""
    moved: int = 0
    """Examples moved to clients short of ``min_size`` (0: the draw was kept as it was)."""
    short_clients: int = 0
    """Clients of the kept draw that held fewer than ``min_size`` examples before the top-up."""


@dataclass
class _Draw:
    """One draw: per category the shuffled members, the client shares and the piece sizes."""

    orders: list[np.ndarray]  # per category: its examples, shuffled
    shares: np.ndarray  # (C, K) client shares of each category (closed clients at 0)
    counts: np.ndarray  # (C, K) examples of each category per client


def _draw(
    members: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator, cap: float
) -> _Draw:
    """One draw of the protocol: the same random numbers, in the same order, as drawing and
    splitting every category in turn (a client that holds ``cap`` examples gets no more)."""
    k = num_clients
    totals = np.zeros(k, dtype=np.int64)
    orders, shares_all, counts = [], np.zeros((len(members), k)), np.zeros((len(members), k), int)
    for c, idx in enumerate(members):
        idx = rng.permutation(idx)
        shares = rng.dirichlet(np.full(k, float(alpha)))
        open_ = totals < cap
        if open_.any():  # all clients full only when the pool is exhausted
            shares = shares * open_
        total = shares.sum()
        shares = shares / total if total > 0 else np.full(k, 1.0 / k)
        cuts = np.minimum((np.cumsum(shares)[:-1] * idx.size).astype(np.int64), idx.size)
        sizes = np.diff(np.concatenate(([0], cuts, [idx.size])))  # what np.split(idx, cuts) gives
        orders.append(idx)
        shares_all[c] = shares
        counts[c] = sizes
        totals += sizes
    return _Draw(orders, shares_all, counts)


def dirichlet_split(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_draws: int | None = None,
) -> DirichletSplit:
    """:func:`partition_dirichlet` with its account: draws made, and examples moved by the
    top-up when no draw gave every client ``min_size`` (see the module doc).

    A draw that gives every client ``min_size`` is returned as it is (the parts the redraw rule
    always gave); the top-up changes only the clients it fills and the donors it takes from.
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
    if max_draws is None:
        shares = num_clients * categories.size
        max_draws = min(DIRICHLET_MAX_DRAWS, max(1, DIRICHLET_MAX_SHARES // shares))
    if max_draws < 1:
        raise ValueError(f"max_draws must be at least 1, got {max_draws}")
    members = [np.flatnonzero(labels == c) for c in categories]
    cap = n / num_clients
    best_state, best_shortfall, best_number = None, None, 0
    for number in range(1, max_draws + 1):
        state = rng.bit_generator.state
        draw = _draw(members, num_clients, alpha, rng, cap)
        sizes = draw.counts.sum(axis=0)
        if sizes.min() >= min_size:
            return DirichletSplit(_assemble(draw, _owners(draw)), number, number)
        shortfall = int(np.maximum(min_size - sizes, 0).sum())
        if best_shortfall is None or shortfall < best_shortfall:
            best_state, best_shortfall, best_number = state, shortfall, number
    replay = np.random.Generator(type(rng.bit_generator)())
    replay.bit_generator.state = best_state
    draw = _draw(members, num_clients, alpha, replay, cap)
    owners = _owners(draw)
    short = int((draw.counts.sum(axis=0) < min_size).sum())
    moved = _top_up(draw, owners, min_size)
    return DirichletSplit(_assemble(draw, owners), max_draws, best_number, moved, short)


def _owners(draw: _Draw) -> list[np.ndarray]:
    """Per category, the client owning each position of its shuffled members."""
    k = draw.counts.shape[1]
    return [np.repeat(np.arange(k), sizes) for sizes in draw.counts]


def _assemble(draw: _Draw, owners: list[np.ndarray]) -> list[np.ndarray]:
    """Each client's examples: category by category, in the shuffled order of each category."""
    k = draw.counts.shape[1]
    index = np.concatenate(draw.orders).astype(np.int64)
    owner = np.concatenate(owners)
    grouped = index[np.argsort(owner, kind="stable")]
    bounds = np.cumsum(np.bincount(owner, minlength=k))[:-1]
    return list(np.split(grouped, bounds))


def _top_up(draw: _Draw, owners: list[np.ndarray], min_size: int) -> int:
    """Give every client short of ``min_size`` the examples it lacks (module doc); updates
    ``draw.counts`` and ``owners`` in place and returns the number of examples moved."""
    counts = draw.counts  # (C, K), kept current
    sizes = counts.sum(axis=0)
    num_categories = counts.shape[0]
    # the positions of each (category, client) piece: its start, and how many it still holds
    starts = np.concatenate((np.zeros((num_categories, 1), int), np.cumsum(counts, 1)[:, :-1]), 1)
    held = counts.copy()  # of the client's own piece, how many are still its own
    drawn = sizes.copy()

    def key(j: int) -> tuple[float, int, int]:  # heapq pops the smallest
        return (-float(sizes[j]) / float(drawn[j]), -int(sizes[j]), j)

    donors = [
        [key(int(j)) for j in np.flatnonzero((counts[c] > 0) & (sizes > min_size))]
        for c in range(num_categories)
    ]
    for heap in donors:
        heapq.heapify(heap)

    def take(c: int) -> int | None:
        """The donor of category ``c``: of the clients holding it that stay above min_size,
        the one that kept the largest fraction of its drawn size (None: no such client)."""
        heap = donors[c]
        while heap:
            j = heap[0][2]
            if held[c, j] == 0 or sizes[j] <= min_size:
                heapq.heappop(heap)
            elif heap[0] != key(j):  # it gave since it was pushed
                heapq.heapreplace(heap, key(j))
            else:
                return j
        return None

    moved = 0
    for k in np.flatnonzero(sizes < min_size):
        # its categories, the one its Dirichlet share favours most first (ties: lower code)
        preference = np.argsort(-draw.shares[:, k], kind="stable")
        while sizes[k] < min_size:
            for c in preference:
                j = take(int(c))
                if j is not None:
                    break
            else:  # pragma: no cover - min_size * K <= n leaves a donor while a client is short
                raise RuntimeError("Dirichlet top-up found no donor")
            held[c, j] -= 1
            owners[c][starts[c, j] + held[c, j]] = k  # the donor's last example of c moves
            counts[c, j] -= 1
            counts[c, k] += 1
            sizes[j] -= 1
            sizes[k] += 1
            moved += 1
    return moved


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


def local_test_count(size: int, frac: float) -> int:
    """Examples a client of ``size`` holds out for its personalised evaluation at ``frac``:
    ``round(frac * size)``, at least 1 and at most ``size - 1`` (a client always keeps one
    example to train on), 0 when ``frac`` is 0 or the client has fewer than 2 examples."""
    if frac <= 0 or size < 2:
        return 0
    return min(size - 1, max(1, round(frac * size)))


def carve_local_tests(
    parts: Sequence[np.ndarray], frac: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(training parts, local test parts)``: from each client's indices ``parts[k]`` a seeded
    draw of :func:`local_test_count` of them is held out (kept in their original order), the
    rest stays for training (in its original order). Nothing is drawn for a client that
    holds out nothing."""
    train, test = [], []
    for part in parts:
        part = np.asarray(part)
        m = local_test_count(int(part.size), frac)
        held = np.zeros(part.size, dtype=bool)
        if m:
            held[rng.choice(part.size, size=m, replace=False)] = True
        train.append(part[~held])
        test.append(part[held])
    return train, test


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
