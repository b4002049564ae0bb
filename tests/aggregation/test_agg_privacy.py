"""Client-level DP of the aggregation (rblora.aggregation.privacy): fixed weights, clipping of
each client's whole term, noise from a secret key, empty rounds, adaptive clipping, the
randomized SVD of a noised update."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from agg_helpers import client_delta, fit, make_clients

from rblora.aggregation import aggregate, available_methods, get_method
from rblora.aggregation.linalg import randomized_svd
from rblora.aggregation.privacy import (
    AdaptiveClip,
    ClientDP,
    check_private,
    new_noise_key,
    private_aggregate,
    secret_generator,
    update_noise_multiplier,
)
from rblora.aggregation.types import ClientUpdate

HUGE = 1e12  # a clip no term reaches
KEY = bytes(range(32))  # a fixed key: these tests compare draws


def noise(round_=0):
    return secret_generator(KEY, round_)


def population(ranks, sizes, seed=0, shapes=None, method=None):
    """Client updates whose client_id is their population index, as the server sends them
    (``method``: shaped for its client protocol, see ``make_clients``)."""
    clients = make_clients(ranks, sizes, seed=seed, shapes=shapes, method=method)
    return [dataclasses.replace(u, client_id=k) for k, u in enumerate(clients)]


def dp_of(ranks, sizes, clip=HUGE, z=0.0, q=1.0):
    return ClientDP(clip, z, q, tuple(ranks), tuple(sizes))


def released(g, module):
    """What the global update of ``module`` is (dense product of the factors, noise included)."""
    return g.delta(module).double()


@pytest.mark.parametrize("method", [m for m in available_methods() if not get_method(m).dp_note])
def test_without_clip_or_noise_and_everyone_selected_it_is_the_method_itself(method):
    ranks = fit(method, [2, 3, 5])
    sizes = [10, 30, 60]
    clients = population(ranks, sizes, method=method)
    reduction = "svd" if "svd" in get_method(method).reductions else None
    plain = aggregate(method, clients, reduction=reduction)
    private, report = private_aggregate(
        method, clients, dp_of(ranks, sizes), noise=noise(1), reduction=reduction
    )
    assert report.clipped == 0
    for m in plain.modules:
        torch.testing.assert_close(released(private, m), released(plain, m), rtol=1e-10, atol=1e-12)


def test_a_term_of_norm_10c_contributes_exactly_c_and_one_under_c_is_untouched():
    ranks, sizes = [2, 4], [25, 75]
    clients = population(ranks, sizes)
    dp = dp_of(ranks, sizes)
    # FlexLoRA's term of client 1 is p_1 dW_1 with p_1 = 75 / 100 (fixed denominator, q = 1)
    term = {m: 0.75 * client_delta(clients[1], m) for m in clients[1].factors}
    norm = math.sqrt(sum(float(t.square().sum()) for t in term.values()))
    clip = norm / 10
    g, report = private_aggregate("FlexLoRA", [clients[1]], dataclasses.replace(dp, clip=clip),
                                  noise=noise(0))  # fmt: skip
    assert report.norms[0] == pytest.approx(norm, rel=1e-12)
    assert report.factors[0] == pytest.approx(0.1, rel=1e-12)
    got = math.sqrt(sum(float(released(g, m).square().sum()) for m in g.modules))
    assert got == pytest.approx(clip, rel=1e-10)
    g, report = private_aggregate("FlexLoRA", [clients[1]], dataclasses.replace(dp, clip=norm * 2),
                                  noise=noise(0))  # fmt: skip
    assert report.factors == (1.0,)
    for m in g.modules:
        torch.testing.assert_close(released(g, m), term[m], rtol=1e-12, atol=1e-14)


def _update(k, a, b, n, alpha):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ClientUpdate(num_examples=n, lora_alpha=alpha, factors={"m": (a, b)}, client_id=k)


def test_hand_computed_rb_lora_term_clipped():
    # population ranks (1, 2), sizes (1, 3): gamma_0 = (1/4, 3/4), gamma_1 = (-, 1)
    # client 1: A = I, B = 2 I, alpha = r = 2 (scale 1): term = diag(0.75 * 2, 1 * 2), norm 2.5
    u = _update(1, [[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]], 3, 2.0)
    g, report = private_aggregate("RB-LoRA", [u], dp_of([1, 2], [1, 3], clip=1.0), noise=noise(0))
    assert report.norms == (pytest.approx(2.5),)
    expected = torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(released(g, "m"), expected, rtol=1e-12, atol=1e-14)


def test_hand_computed_flexlora_term_with_fixed_denominator():
    # population sizes (1, 3), q = 1/2: client 0's weight is 1 / (0.5 * 4) = 0.5, whoever else
    # takes part. dW_0 = [[5], [0]] @ [[0.6, 0.8]] = [[3, 4], [0, 0]] (norm 5), term norm 2.5
    u = _update(0, [[0.6, 0.8]], [[5.0], [0.0]], 1, 1.0)
    dp = dp_of([1, 1], [1, 3], clip=1.0, q=0.5)
    g, report = private_aggregate("FlexLoRA", [u], dp, noise=noise(0))
    assert report.norms == (pytest.approx(2.5),)
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(released(g, "m"), expected, rtol=1e-12, atol=1e-14)


def test_padded_methods_clip_the_weighted_factors_of_a_client():
    # Weighted HETLoRA, population sizes (1, 3), q = 1: client 1's term is (3/4 A, 3/4 Bh)
    u = _update(1, [[3.0, 0.0]], [[0.0], [4.0]], 3, 1.0)  # ||A||^2 + ||Bh||^2 = 25
    g, report = private_aggregate(
        "Weighted HETLoRA", [u], dp_of([1, 1], [1, 3], clip=1.5), noise=noise(0)
    )
    assert report.norms == (pytest.approx(0.75 * 5),)
    a, b = g.factors("m")  # clipped to 1.5: each factor scaled by 0.75 * 1.5 / 3.75 = 0.3
    torch.testing.assert_close(a, torch.tensor([[0.9, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([[0.0], [1.2]], dtype=torch.float64))


@pytest.mark.parametrize("method", ["RB-LoRA", "FlexLoRA", "Uniform HETLoRA", "RB-LoRA (factor)"])
def test_one_client_moves_the_sum_by_at_most_c_and_never_changes_the_others(method):
    ranks, sizes = [2, 3, 5, 5], [10, 20, 30, 40]
    clients = population(ranks, sizes)
    dp = dp_of(ranks, sizes, clip=0.3, q=0.75)
    with_, _ = private_aggregate(method, clients[:3], dp, noise=noise(0))
    without, _ = private_aggregate(method, clients[:2], dp, noise=noise(0))
    alone, _ = private_aggregate(method, clients[2:3], dp, noise=noise(0))
    if get_method(method).form == "stack":  # released: the dense sum of the terms
        diff = [released(with_, m) - released(without, m) for m in with_.modules]
        for d, m in zip(diff, with_.modules, strict=True):
            torch.testing.assert_close(d, released(alone, m), rtol=1e-9, atol=1e-12)
    else:  # released: the two factors, each a sum of the clients' terms
        diff = []
        for m in with_.modules:
            for x, y, z in zip(with_.factors(m), without.factors(m), alone.factors(m), strict=True):
                # the population's width (5) whoever takes part
                assert x.shape == y.shape == z.shape
                torch.testing.assert_close(x - y, z, rtol=1e-9, atol=1e-12)
                diff.append(x - y)
    assert math.sqrt(sum(float(d.square().sum()) for d in diff)) <= 0.3 * (1 + 1e-9)


def test_noise_has_std_z_times_c_and_follows_the_key():
    ranks, sizes = [2], [10]
    shapes = {"m": (120, 100)}
    (u,) = population(ranks, sizes, shapes=shapes)
    z, clip = 1.7, 0.4
    clean, _ = private_aggregate("FlexLoRA", [u], dp_of(ranks, sizes, clip=clip), noise=noise(0))
    dp = dp_of(ranks, sizes, clip, z)
    draws = torch.cat(
        [
            (released(private_aggregate("FlexLoRA", [u], dp, noise=noise(s))[0], "m")
             - released(clean, "m")).flatten()
            for s in range(20)
        ]
    )  # fmt: skip
    n = draws.numel()  # 240,000 draws: the std's standard error is std / sqrt(2 n)
    assert float(draws.mean()) == pytest.approx(0.0, abs=4 * z * clip / math.sqrt(n))
    assert float(draws.std()) == pytest.approx(z * clip, abs=4 * z * clip / math.sqrt(2 * n))
    again = private_aggregate("FlexLoRA", [u], dp_of(ranks, sizes, clip, z), noise=noise(3))[0]
    first = private_aggregate("FlexLoRA", [u], dp_of(ranks, sizes, clip, z), noise=noise(3))[0]
    assert torch.equal(again.delta("m"), first.delta("m"))
    other = private_aggregate("FlexLoRA", [u], dp_of(ranks, sizes, clip, z), noise=noise(4))[0]
    assert not torch.equal(other.delta("m"), first.delta("m"))


def test_dense_extras_are_clipped_with_the_factors_and_noised():
    ranks, sizes = [2, 2], [10, 30]
    clients = [
        dataclasses.replace(u, dense={"head.weight": torch.full((3, 4), 2.0, dtype=torch.float64)})
        for u in population(ranks, sizes)
    ]
    g, report = private_aggregate("FlexLoRA", clients, dp_of(ranks, sizes), noise=noise(0))
    plain = aggregate("FlexLoRA", clients)
    torch.testing.assert_close(g.dense["head.weight"], plain.dense["head.weight"])
    lora_only = private_aggregate(
        "FlexLoRA",
        [dataclasses.replace(u, dense={}) for u in clients],
        dp_of(ranks, sizes),
        noise=noise(0),
    )[1]
    # the head's weighted term (p_k * 2 over 12 entries) is part of each client's norm
    for k, p in enumerate((0.25, 0.75)):
        expected = math.sqrt(lora_only.norms[k] ** 2 + 12 * (2 * p) ** 2)
        assert report.norms[k] == pytest.approx(expected, rel=1e-12)
    noisy = private_aggregate("FlexLoRA", clients, dp_of(ranks, sizes, 1.0, 1.0), noise=noise(0))[0]
    assert not torch.equal(noisy.dense["head.weight"], g.dense["head.weight"])


def test_redistribution_of_a_noised_update_gives_each_rank():
    ranks, sizes = [2, 4], [10, 30]
    clients = population(ranks, sizes)
    g, _ = private_aggregate("RB-LoRA", clients, dp_of(ranks, sizes, 1.0, 0.5), noise=noise(0))
    assert all(g.is_dense(m) for m in g.modules)
    for r in ranks:
        start = g.for_client(r, 16.0)
        for m, (a, b) in start.items():
            assert a.shape == (r, g.shape(m)[1]) and b.shape == (g.shape(m)[0], r)


def test_refusals():
    with pytest.raises(ValueError, match="truncate cannot be made differentially private"):
        check_private("FLoRA", "truncate")
    check_private("FLoRA", "merge")
    check_private("Uniform HETLoRA", "truncate")
    ranks, sizes = [2, 2], [10, 30]
    clients = make_clients(ranks, sizes)  # client ids "c0", "c1": not population indices
    with pytest.raises(ValueError, match="client_id must be the client's index"):
        private_aggregate("RB-LoRA", clients, dp_of(ranks, sizes), noise=noise(0))
    with pytest.raises(ValueError, match="examples, population has"):
        private_aggregate(
            "RB-LoRA", population(ranks, sizes), dp_of(ranks, [10, 31]), noise=noise(0)
        )
    with pytest.raises(ValueError, match="dp clip"):
        dp_of(ranks, sizes, clip=0.0)


def test_the_noise_follows_the_key_not_a_seed():
    """Two keys give independent noise; the same key and round give the same draws; another
    round of the same key gives other draws; a fresh key comes from the OS CSPRNG."""
    ranks, sizes = [2], [10]
    (u,) = population(ranks, sizes, shapes={"m": (20, 16)})
    dp = dp_of(ranks, sizes, 1.0, 1.0)

    def release(key, round_):
        g = private_aggregate("FlexLoRA", [u], dp, noise=secret_generator(key, round_))[0]
        return g.delta("m")

    a, b = new_noise_key(), new_noise_key()
    assert len(a) == 32 and a != b
    assert torch.equal(release(a, 1), release(a, 1))
    assert not torch.equal(release(a, 1), release(b, 1))
    assert not torch.equal(release(a, 1), release(a, 2))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        secret_generator(b"short", 1)
    with pytest.raises(ValueError, match="needs the noise generator"):
        private_aggregate("FlexLoRA", [u], dp, noise=None)


@pytest.mark.parametrize("method", ["RB-LoRA", "FlexLoRA", "Weighted HETLoRA"])
def test_an_empty_round_releases_the_noise_alone_in_the_release_shape(method):
    ranks, sizes = [2, 5], [10, 30]
    shapes = {"m1": (12, 9), "m2": (7, 11)}
    dp = dp_of(ranks, sizes, 0.5, 2.0)
    dense = {"head": (3, 4)}
    g, report = private_aggregate(method, [], dp, noise=noise(3), shapes=shapes,
                                  dense_shapes=dense)  # fmt: skip
    assert report.norms == () and report.unclipped == 0
    assert g.dense["head"].shape == (3, 4)
    spec = get_method(method)
    for m, (d_out, d_in) in shapes.items():
        if spec.form == "stack":
            assert g.is_dense(m) and g.shape(m) == (d_out, d_in)
        else:  # both factors at the population's widest rank, noise only
            a, b = g.factors(m)
            assert a.shape == (5, d_in) and b.shape == (d_out, 5)
    values = torch.cat([g.dense["head"].flatten()] + [
        g.module_delta(m).flatten() if g.is_dense(m) else torch.cat([t.flatten() for t in
        g.factors(m)]) for m in g.modules])  # fmt: skip
    assert 0.5 < float(values.std()) / (2.0 * 0.5) < 1.5  # N(0, (z C)^2), few draws
    with pytest.raises(ValueError, match="the release's shapes must be given"):
        private_aggregate(method, [], dp, noise=noise(3))
    (u,) = population([2], [10], shapes={"m1": (12, 9)})
    with pytest.raises(ValueError, match="module set differs from client 0.s: missing"):
        private_aggregate(method, [u], dp, noise=noise(3), shapes=shapes)


def test_adaptive_clipping_rule_by_hand():
    """C' = C exp(-eta ((b + sigma_b xi) / m - gamma)), hand-computed."""
    rule = AdaptiveClip(quantile=0.5, learning_rate=0.2, count_stddev=2.0, expected_clients=10)
    # 8 of 10 unclipped, noise draw -1 -> b~ = (8 - 2) / 10 = 0.6; C' = 0.1 exp(-0.2 * 0.1)
    assert rule.next_clip(0.1, 8, -1.0) == pytest.approx(0.1 * math.exp(-0.02), rel=1e-15)
    # 2 of 10 unclipped, no noise -> b~ = 0.2; C grows: 0.1 exp(0.06)
    assert rule.next_clip(0.1, 2, 0.0) == pytest.approx(0.1 * math.exp(0.06), rel=1e-15)
    for bad in ({"quantile": 1.0}, {"learning_rate": 0.0}, {"count_stddev": -1.0}):
        with pytest.raises(ValueError):
            AdaptiveClip(**{"quantile": 0.5, "learning_rate": 0.2, "count_stddev": 1.0,
                            "expected_clients": 10, **bad})  # fmt: skip


def test_the_clip_report_counts_the_unclipped_clients():
    ranks, sizes = [2, 3, 5], [10, 20, 30]
    clients = population(ranks, sizes)
    plain = private_aggregate("FlexLoRA", clients, dp_of(ranks, sizes), noise=noise())[1]
    clip = sorted(plain.norms)[1]  # the median: two terms at most C, one above
    report = private_aggregate("FlexLoRA", clients, dp_of(ranks, sizes, clip=clip),
                               noise=noise())[1]  # fmt: skip
    assert report.clip == clip and report.unclipped == 2 and report.clipped == 1


def test_the_noise_split_of_adaptive_clipping():
    """z_u = (z^-2 - (2 sigma_b)^-2)^-1/2; the pair (z_u, sigma_b) costs what z costs."""
    z, sigma_b = 1.0, 2.5
    z_u = update_noise_multiplier(z, sigma_b)
    assert z_u == pytest.approx((1 - 1 / 25) ** -0.5, rel=1e-15)
    assert (z_u**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    assert update_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="too small for the noise multiplier 1"):
        update_noise_multiplier(1.0, 0.5)


def _low_rank_plus_noise(d_out, d_in, r, noise, seed):
    """A rank-``r`` signal of unit norm with singular values decaying as ``0.8^j`` (a LoRA
    update's spectrum decays), plus i.i.d. noise of std ``noise`` per entry."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d_out, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(d_in, r, generator=gen)).Q
    signal = (u * 0.8 ** torch.arange(r, dtype=torch.float32)) @ v.T
    return signal / signal.norm() + noise * torch.randn(d_out, d_in, generator=gen)


# (noise std, rank, largest excess error, largest distance to the dense SVD's projection): where
# the signal's top singular values stand above the noise's (about noise * (sqrt(300) + sqrt(256))
# = 33 noise), the projection is the dense SVD's to float32 rounding; where noise dominates, its
# directions are arbitrary among near-equal singular values (the dense SVD's choice is no better):
# the approximation error stays within 0.4% of the optimum. Measured (power_iters 4, oversample
# 10): excess 1e-13 .. 3.3e-3, distance 2e-7 (signal-dominated) .. 0.75 (noise-dominated).
CASES = [
    (1e-4, 4, 1e-9, 1e-5),
    (1e-4, 16, 1e-9, 1e-5),
    (1e-3, 4, 1e-9, 1e-5),
    (1e-3, 16, 1e-3, None),
    (1e-2, 4, 1e-3, None),
    (1e-2, 16, 5e-3, None),
    (1e-1, 16, 5e-3, None),
]


@pytest.mark.parametrize(("noise", "rank", "max_excess", "max_distance"), CASES)
def test_randomized_svd_against_the_dense_svd(noise, rank, max_excess, max_distance):
    """The range finder's best rank-``rank`` approximation against the float64 dense SVD's."""
    m = _low_rank_plus_noise(300, 256, 32, noise, seed=0)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    a, b = randomized_svd(m, rank, generator=torch.Generator().manual_seed(1))
    approx = b.double() @ a.double()
    excess = float((m.double() - approx).norm() / (m.double() - best).norm()) - 1
    assert excess < max_excess
    if max_distance is not None:
        assert float((approx - best).norm() / best.norm()) < max_distance
    again = randomized_svd(m, rank, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], a) and torch.equal(again[1], b)
    torch.testing.assert_close(a @ a.T, torch.eye(rank), atol=1e-5, rtol=0)


def test_term_norm_from_r_by_r_products_equals_the_dense_norm():
    from rblora.aggregation.privacy import term_norm_sq

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    bh = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    g = torch.rand(6, generator=gen, dtype=torch.float64)
    dense = (bh * g) @ a
    assert term_norm_sq("stack", a, bh, g) == pytest.approx(float(dense.square().sum()), rel=1e-12)
    padded = float((g[:, None] * a).square().sum() + (bh * g).square().sum())
    assert term_norm_sq("padded", a, bh, g) == pytest.approx(padded, rel=1e-12)


def test_quick_privacy_benchmark_runs():
    import re
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_privacy.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--dense"], capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"private aggregation .*: [\d.]+ s", proc.stdout)
    excess = [float(x) for x in re.findall(r"excess error ([\d.e+-]+)", proc.stdout)]
    assert len(excess) == 2 and all(0 <= x < 1e-2 for x in excess)


def test_ffa_lora_term_is_its_b_alone_and_only_b_is_noised():
    # population ranks (1, 1), sizes (1, 3), q = 1: client 1's weight is 3/4. A = [[3, 0]] is
    # frozen (public), not released: the term is 3/4 Bh = [[0], [3]], norm 3 (Weighted HETLoRA
    # would count A too: 3.75). Clipped to 1.5: B_g = 3/4 * 1.5/3 * [[0], [4]] = [[0], [1.5]].
    u = _update(1, [[3.0, 0.0]], [[0.0], [4.0]], 3, 1.0)
    g, report = private_aggregate("FFA-LoRA", [u], dp_of([1, 1], [1, 3], clip=1.5), noise=noise(0))
    assert report.norms == (pytest.approx(3.0),)
    a, b = g.factors("m")
    torch.testing.assert_close(a, torch.tensor([[3.0, 0.0]], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(b, torch.tensor([[0.0], [1.5]], dtype=torch.float64))
    noisy, _ = private_aggregate(
        "FFA-LoRA", [u], dp_of([1, 1], [1, 3], clip=1.5, z=2.0), noise=noise(0)
    )
    a_noisy, b_noisy = noisy.factors("m")
    assert torch.equal(a_noisy, a) and not torch.allclose(b_noisy, b)


def test_ffa_lora_one_client_moves_the_released_b_by_at_most_c():
    from rblora.aggregation.frozen import FrozenInit

    ranks, sizes = [2, 3, 5, 5], [10, 20, 30, 40]
    init = FrozenInit(7)
    clients = [
        dataclasses.replace(
            u, factors={m: (init.rows(m, a.shape[0], a.shape[1]).double(), b)
                        for m, (a, b) in u.factors.items()},
        )
        for u in population(ranks, sizes, method="FFA-LoRA")
    ]  # fmt: skip
    dp = dp_of(ranks, sizes, clip=0.3, q=0.75)
    run = {"held": init, "noise": noise(0)}
    with_, _ = private_aggregate("FFA-LoRA", clients[:3], dp, **run)
    without, _ = private_aggregate("FFA-LoRA", clients[:2], dp, **run)
    alone, _ = private_aggregate("FFA-LoRA", clients[2:3], dp, **run)
    diff = []
    for m in with_.modules:
        (a1, b1), (a2, b2), (a3, b3) = with_.factors(m), without.factors(m), alone.factors(m)
        # A is the run's frozen initialisation at the population's width, whoever took part
        for a in (a1, a2, a3):
            assert torch.equal(a, init.rows(m, 5, a.shape[1]).double())
        torch.testing.assert_close(b1 - b2, b3, rtol=1e-9, atol=1e-12)
        diff.append(b1 - b2)
    moved = math.sqrt(sum(float(d.square().sum()) for d in diff))
    assert 0 < moved <= 0.3 * (1 + 1e-9)


def _rolora_basis(width, shapes, seed=5):
    """The server's global factors (a start basis) an even RoLoRA round holds B from."""
    from rblora.aggregation.starts import StartBasis

    gen = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(width, d_in, generator=gen, dtype=torch.float64),
                   torch.randn(d_out, width, generator=gen, dtype=torch.float64))
               for m, (d_out, d_in) in shapes.items()}  # fmt: skip
    return StartBasis(width, factors, torch.float64)


def test_rolora_even_round_term_is_its_a_alone_and_only_a_is_noised():
    # population ranks (1, 1), sizes (1, 3), q = 1: client 1's weight is 3/4. B is held at the
    # server's global Bh = [[0], [4]] (public, not released; the client's own copy is not
    # read): the term is 3/4 A = [[3, 0]], norm 3. Clipped to 1.5: A_g = [[1.5, 0]].
    from rblora.aggregation.starts import StartBasis

    basis = StartBasis(1, {"m": (torch.zeros(1, 2, dtype=torch.float64),
                                 torch.tensor([[0.0], [4.0]], dtype=torch.float64))},
                       torch.float64)  # fmt: skip
    u = _update(1, [[4.0, 0.0]], [[7.0], [7.0]], 3, 1.0)
    run = {"held": basis, "round_": 2}
    g, report = private_aggregate("RoLoRA", [u], dp_of([1, 1], [1, 3], clip=1.5), noise=noise(0),
                                  **run)  # fmt: skip
    assert report.norms == (pytest.approx(3.0),)
    a, b = g.factors("m")
    torch.testing.assert_close(a, torch.tensor([[1.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([[0.0], [4.0]], dtype=torch.float64), rtol=0,
                               atol=0)  # fmt: skip
    noisy, _ = private_aggregate("RoLoRA", [u], dp_of([1, 1], [1, 3], clip=1.5, z=2.0),
                                 noise=noise(0), **run)  # fmt: skip
    a_noisy, b_noisy = noisy.factors("m")
    assert torch.equal(b_noisy, b) and not torch.allclose(a_noisy, a)
    # an odd round releases B alone: A (here the client's shared prefix) is not noised
    odd, _ = private_aggregate("RoLoRA", [u], dp_of([1, 1], [1, 3], clip=1.5, z=2.0),
                               noise=noise(0))  # fmt: skip
    assert torch.equal(odd.factors("m")[0], torch.tensor([[4.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("round_", [1, 2])
def test_rolora_one_client_moves_the_released_factor_by_at_most_c(round_):
    """Odd rounds release B (A held), even rounds A (B held at the server's global factors):
    adding or removing one client moves the released factor by at most C, and the held one not
    at all."""
    from agg_helpers import SHAPES

    from rblora.aggregation.frozen import FrozenInit

    ranks, sizes = [2, 3, 5, 5], [10, 20, 30, 40]
    clients = population(ranks, sizes, method="RoLoRA")  # A: prefixes of one matrix per module
    basis = _rolora_basis(5, SHAPES)
    dp = dp_of(ranks, sizes, clip=0.3, q=0.75)
    # round 1 holds A at the run's seeded initialisation, round 2 B at the server's global Bh
    held = basis if round_ == 2 else FrozenInit(7)
    run = {"noise": noise(0), "round_": round_, "held": held}
    with_, _ = private_aggregate("RoLoRA", clients[:3], dp, **run)
    without, _ = private_aggregate("RoLoRA", clients[:2], dp, **run)
    alone, _ = private_aggregate("RoLoRA", clients[2:3], dp, **run)
    trained = 1 if round_ == 1 else 0  # index of the released factor in (A, B)
    diff = []
    for m in with_.modules:
        x, y, z = with_.factors(m), without.factors(m), alone.factors(m)
        held_at = 1 - trained
        assert torch.equal(x[held_at], y[held_at]) and torch.equal(x[held_at], z[held_at])
        d_in = SHAPES[m][1]
        expected = basis.factors[m][1] if round_ == 2 else FrozenInit(7).rows(m, 5, d_in)
        assert torch.equal(x[held_at], expected.double())  # at the population's width
        torch.testing.assert_close(x[trained] - y[trained], z[trained], rtol=1e-9, atol=1e-12)
        diff.append(x[trained] - y[trained])
    moved = math.sqrt(sum(float(d.square().sum()) for d in diff))
    assert 0 < moved <= 0.3 * (1 + 1e-9)


def test_fedex_lora_term_counts_both_factors_and_the_update():
    # population ranks (1, 1), sizes (1, 3), q = 1: client 1's weight is 3/4. A = [[1, 0]],
    # B = [[0], [4]], s = 1: the factor terms 3/4 A (norm .75), 3/4 B (norm 3) and the update
    # term 3/4 B A (norm 3) are released together: norm sqrt(.5625 + 9 + 9).
    u = _update(1, [[1.0, 0.0]], [[0.0], [4.0]], 3, 1.0)
    g, report = private_aggregate("FedEx-LoRA", [u], dp_of([1, 1], [1, 3]), noise=noise(0))
    assert report.norms == (pytest.approx(math.sqrt(18.5625)),)
    # unclipped, noiseless: the released sum is 3/4 B A, the factors 3/4 A and 3/4 B
    torch.testing.assert_close(g.delta("m"), 0.75 * torch.tensor([[0.0, 0.0], [4.0, 0.0]],
                                                                 dtype=torch.float64))  # fmt: skip
    assert g.folds_residual


def test_fedex_lora_one_client_moves_the_release_by_at_most_c():
    """The release is the two averaged factors and the dense sum of the updates (the residual
    is computed from them): one client moves the three together by at most C."""
    ranks, sizes = [2, 3, 5, 5], [10, 20, 30, 40]
    clients = population(ranks, sizes)
    dp = dp_of(ranks, sizes, clip=0.3, q=0.75)
    with_, _ = private_aggregate("FedEx-LoRA", clients[:3], dp, noise=noise(0))
    without, _ = private_aggregate("FedEx-LoRA", clients[:2], dp, noise=noise(0))
    alone, _ = private_aggregate("FedEx-LoRA", clients[2:3], dp, noise=noise(0))
    diff = []
    for m in with_.modules:
        x = (*with_.factors(m), with_.delta(m))  # delta: the released sum of the updates
        y = (*without.factors(m), without.delta(m))
        z = (*alone.factors(m), alone.delta(m))
        for p, q, r in zip(x, y, z, strict=True):
            torch.testing.assert_close(p - q, r, rtol=1e-9, atol=1e-12)
            diff.append(p - q)
    moved = math.sqrt(sum(float(d.square().sum()) for d in diff))
    assert 0 < moved <= 0.3 * (1 + 1e-9)
    # with noise the residual is dense: the base total of a private FedEx-LoRA run is dense
    noised = dataclasses.replace(dp, noise_multiplier=1.0)
    noisy, _ = private_aggregate("FedEx-LoRA", clients[:3], noised, noise=noise(0))
    assert all(torch.is_tensor(noisy.residual(m)) for m in noisy.modules)


def test_fedsa_lora_term_is_its_a_alone_and_only_a_is_noised():
    # population ranks (1, 1), sizes (1, 3), q = 1: client 1's weight is 3/4. B = [[7], [7]] is
    # the client's own (never released, never read): the term is 3/4 A = [[3, 0]], norm 3.
    # Clipped to 1.5: A_g = [[1.5, 0]]; B_g is zero, with or without noise.
    u = _update(1, [[4.0, 0.0]], [[7.0], [7.0]], 3, 1.0)
    dp = dp_of([1, 1], [1, 3], clip=1.5)
    g, report = private_aggregate("FedSA-LoRA", [u], dp, noise=noise(0))
    assert report.norms == (pytest.approx(3.0),)
    a, b = g.factors("m")
    torch.testing.assert_close(a, torch.tensor([[1.5, 0.0]], dtype=torch.float64))
    assert not b.any()
    noisy, _ = private_aggregate("FedSA-LoRA", [u], dataclasses.replace(dp, noise_multiplier=2.0),
                                 noise=noise(0))  # fmt: skip
    a_noisy, b_noisy = noisy.factors("m")
    assert not b_noisy.any() and not torch.allclose(a_noisy, a)


def test_fedsa_lora_one_client_moves_the_released_a_by_at_most_c():
    """Adding or removing one client moves the released A by at most C (its clipped term), and
    the client's B reaches nothing of the release."""
    ranks, sizes = [2, 3, 5, 5], [10, 20, 30, 40]
    clients = population(ranks, sizes, method="FedSA-LoRA")
    dp = dp_of(ranks, sizes, clip=0.3, q=0.75)
    with_, _ = private_aggregate("FedSA-LoRA", clients[:3], dp, noise=noise(0))
    without, _ = private_aggregate("FedSA-LoRA", clients[:2], dp, noise=noise(0))
    alone, _ = private_aggregate("FedSA-LoRA", clients[2:3], dp, noise=noise(0))
    other_b = [dataclasses.replace(u, factors={m: (a, 9 * b) for m, (a, b) in u.factors.items()})
               for u in clients[:3]]  # fmt: skip
    same, _ = private_aggregate("FedSA-LoRA", other_b, dp, noise=noise(0))
    diff = []
    for m in with_.modules:
        (a1, b1), (a2, _), (a3, _) = with_.factors(m), without.factors(m), alone.factors(m)
        assert not b1.any() and torch.equal(same.factors(m)[0], a1)
        torch.testing.assert_close(a1 - a2, a3, rtol=1e-9, atol=1e-12)
        diff.append(a1 - a2)
    moved = math.sqrt(sum(float(d.square().sum()) for d in diff))
    assert 0 < moved <= 0.3 * (1 + 1e-9)
