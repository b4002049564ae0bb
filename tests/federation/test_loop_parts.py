"""Pieces of the round loop that need no model: export, server state, selection, reports."""

import json

import pytest
import torch

from rblora.aggregation import ClientUpdate
from rblora.federation.results import write_report
from rblora.federation.rounds import exact_factors
from rblora.federation.rundir import RunFolder
from rblora.federation.server import FederatedServer, derive_seed
from rblora.protocol.types import ClientSpec
from rblora.utils.atomic import atomic_dir, write_text


def _factors(rank, d_out=6, d_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q": (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)),
        "m.v": (torch.randn(rank, d_in, generator=g), torch.randn(4, rank, generator=g)),
    }


def _orthonormal_rows(a):
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    torch.testing.assert_close(a.double() @ a.double().T, eye, atol=1e-5, rtol=0)


def test_exact_factors_are_orthonormal_at_each_modules_rank():
    delta = {
        "q": (torch.randn(9, 5), torch.randn(6, 9)),  # wider than the matrix: rank 5
        "v": (torch.randn(2, 5), torch.randn(3, 2)),  # factored, rank 2
        "o": torch.randn(4, 7),  # dense, d_out < d_in: (Q^T, R^T), rank 4
        "k": torch.randn(7, 3),  # dense, d_out > d_in: (I, dW), rank 3
        "z": (torch.zeros(3, 5), torch.zeros(6, 3)),  # nothing: one zero direction
    }
    out = exact_factors(delta)
    assert {m: a.shape[0] for m, (a, _) in out.items()} == {"q": 5, "v": 2, "o": 4, "k": 3, "z": 1}
    assert torch.equal(out["k"][0], torch.eye(3)) and torch.equal(out["k"][1], delta["k"])
    for name, value in delta.items():
        _orthonormal_rows(out[name][0]) if name != "z" else None
        want = value if isinstance(value, torch.Tensor) else value[1] @ value[0]
        torch.testing.assert_close(out[name][1] @ out[name][0], want, rtol=1e-5, atol=1e-5)
    # B's columns are orthogonal (U diag(sigma)), sorted by decreasing norm
    gram = out["v"][1].T @ out["v"][1]
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-5, rtol=0)


def test_selection_is_seeded_and_sized():
    clients = [ClientSpec(k, 4, 16.0) for k in range(10)]
    s = FederatedServer("RB-LoRA", clients, frac=0.3, seed=7)
    picks = [s.select(t) for t in range(1, 6)]
    assert all(len(p) == 3 and p == sorted(set(p)) for p in picks)
    assert picks == [
        FederatedServer("RB-LoRA", clients, frac=0.3, seed=7).select(t) for t in range(1, 6)
    ]
    assert len({tuple(p) for p in picks}) > 1
    assert FederatedServer("RB-LoRA", clients, selection="all").select(3) == list(range(10))
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 3, 2)


def test_poisson_sampling_without_dp_is_seeded_and_never_empty():
    """Each client with probability q, from the run seed; a draw of nobody is drawn again (only
    a DP round may be empty: it releases the noise alone)."""
    clients = [ClientSpec(k, 4, 16.0) for k in range(4)]
    s = FederatedServer("RB-LoRA", clients, frac=0.1, sampling="poisson", seed=7)
    picks = [s.select(t) for t in range(1, 401)]
    assert all(p and p == sorted(set(p)) for p in picks)
    again = FederatedServer("RB-LoRA", clients, frac=0.1, sampling="poisson", seed=7)
    assert picks[:20] == [again.select(t) for t in range(1, 21)]
    many = FederatedServer("RB-LoRA", [ClientSpec(k, 4, 16.0) for k in range(1000)], frac=0.3,
                           sampling="poisson", seed=1)  # fmt: skip
    sizes = [len(many.select(t)) for t in range(1, 21)]
    assert len(set(sizes)) > 1 and all(240 < n < 360 for n in sizes)  # 300 +- 5 sd
    with pytest.raises(ValueError, match="sampling 'bernoulli': valid are fixed, poisson"):
        FederatedServer("RB-LoRA", clients, sampling="bernoulli")


def _updates(specs, seed=0, dense=False):
    return [
        ClientUpdate(
            num_examples=10 * (k + 1),
            lora_alpha=16.0,
            factors=_factors(s.rank, seed=seed + k),
            client_id=k,
            dense={"head.weight": torch.full((2, 3), float(k + seed))} if dense else {},
        )
        for k, s in enumerate(specs)
    ]


@pytest.mark.parametrize("method", ["RB-LoRA", "FLoRA", "Uniform HETLoRA"])
def test_server_state_round_trip(method):
    specs = [ClientSpec(0, 2, 16.0), ClientSpec(1, 4, 16.0), ClientSpec(2, 4, 16.0)]
    server = FederatedServer(method, specs, seed=1, frac=0.67)
    for t in (1, 2):
        for k in server.select(t):
            server.deliver(k)
        server.redistribute(server.aggregate(_updates(specs, seed=t, dense=True)))
    tensors, meta = server.state_tensors()
    again = FederatedServer(method, specs, seed=1, frac=0.67)
    again.load_state_tensors(dict(tensors), json.loads(json.dumps(meta)))
    assert again.completed_rounds == 2
    assert torch.equal(again.dense["head.weight"], server.dense["head.weight"])
    for (m1, d1), (m2, d2) in zip(server.base_total.items(), again.base_total.items(), strict=True):
        assert m1 == m2
        for x, y in zip(
            d1 if isinstance(d1, tuple) else [d1],
            d2 if isinstance(d2, tuple) else [d2],
            strict=True,
        ):
            assert torch.equal(x, y)
    for k in range(3):
        start, restored = server.deliver(k), again.deliver(k)
        assert restored.download_bytes == start.download_bytes > 0
        if start.factors is None:
            assert restored.factors is None
            continue
        for module, (a, b) in start.factors.items():
            assert a.shape[0] == specs[k].rank
            assert torch.equal(restored.factors[module][0], a)
            assert torch.equal(restored.factors[module][1], b)


def test_dense_extras_are_the_example_weighted_mean():
    specs = [ClientSpec(0, 2, 16.0), ClientSpec(1, 4, 16.0)]
    server = FederatedServer("RB-LoRA", specs)
    model = server.redistribute(server.aggregate(_updates(specs, seed=3, dense=True)))
    # clients hold 3 and 4 everywhere, with 10 and 20 examples: (10 * 3 + 20 * 4) / 30
    torch.testing.assert_close(model.dense["head.weight"], torch.full((2, 3), 110 / 30))
    assert server.deliver(0).dense["head.weight"].equal(model.dense["head.weight"])


def test_merge_total_is_exact_and_bounded():
    from rblora.aggregation.running import UpdateSum

    g = torch.Generator().manual_seed(0)
    total, dense_sum = UpdateSum(), torch.zeros(6, 5)
    sizes = []
    for _ in range(6):
        a, b = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
        total.add({"m": (a, b)})
        dense_sum += b @ a
        ((_, delta),) = total.items()
        sizes.append(
            sum(t.numel() for t in ([delta] if isinstance(delta, torch.Tensor) else delta))
        )
        got = delta if isinstance(delta, torch.Tensor) else delta[1] @ delta[0]
        torch.testing.assert_close(got, dense_sum, rtol=1e-5, atol=1e-5)
    # 2 * 11 = 22, then 44 >= 30 -> dense 30 for good
    assert sizes == [22, 30, 30, 30, 30, 30]


def test_merged_total_exposes_no_client_block():
    """FLoRA's running total, which every client receives, holds the sum in SVD form (orthonormal
    rows of A, orthogonal columns of B), not the stack of each client's own factors."""
    from rblora.aggregation.running import UpdateSum

    g = torch.Generator().manual_seed(1)
    clients = [(torch.randn(r, 40, generator=g), torch.randn(30, r, generator=g)) for r in (2, 3)]
    stack = (torch.cat([a for a, _ in clients]), torch.cat([b for _, b in clients], dim=1))
    total = UpdateSum()
    total.add({"m": stack})
    a, b = total.as_dict()["m"]
    expected = sum(bk @ ak for ak, bk in clients)
    torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-5)
    assert a.shape == (5, 40)
    torch.testing.assert_close(a @ a.T, torch.eye(5), rtol=0, atol=1e-5)  # V^T: orthonormal rows
    gram = b.T @ b
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-3)
    for ak, _ in clients:  # no client's own rows are in what clients receive
        assert not any(torch.allclose(row, a_row) for row in ak for a_row in a)
    # an update that cancels the total leaves (float32 rounding of) zero
    total.add({"m": (a.clone(), -b.clone())})
    a0, b0 = total.as_dict()["m"]
    assert float((b0 @ a0).abs().max()) < 1e-5


def test_merged_total_keeps_every_direction_of_clients_whose_scales_differ():
    """Scales that differ 64x (alpha 16 at ranks 2 and 128) and data weights: every direction
    of the stack is a direction of the sum, and none may be cut as rounding (a cut-off relative
    to the factors' norms kept 435 of these 468)."""
    from rblora.aggregation.running import svd_factors

    g = torch.Generator().manual_seed(2)
    ranks, d = (2, 2, 8, 8, 32, 32, 64, 64, 128, 128), 1280
    weights = torch.tensor([5.0, 5, 10, 10, 15, 15, 19, 19, 25, 25]) / 148
    blocks = [
        (p * torch.randn(r, d, generator=g) / d**0.5, torch.randn(d, r, generator=g) * 0.016 / r)
        for r, p in zip(ranks, weights, strict=True)
    ]
    a = torch.cat([x for x, _ in blocks])
    b = torch.cat([y for _, y in blocks], dim=1)
    a2, b2 = svd_factors(a, b)
    assert a2.shape[0] == sum(ranks)
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=1e-4, atol=1e-9)


def test_merge_download_counts_every_missed_merge():
    specs = [ClientSpec(0, 1, 16.0), ClientSpec(1, 1, 16.0)]
    server = FederatedServer("FLoRA", specs, selection="all")
    assert server.deliver(0).download_bytes == 0  # round 1: nothing merged yet
    server.redistribute(server.aggregate(_updates(specs, seed=1)))  # a merge of width 2
    server.deliver(0)
    server.redistribute(server.aggregate(_updates(specs, seed=2)))
    # client 0 has round 1's merge and needs round 2's: width 2 on q (6x5) and v (4x5);
    # client 1 needs both (width 4), each module at most one dense matrix
    assert server.deliver(0).download_bytes == (2 * 11 + 2 * 9) * 4
    assert server.deliver(1).download_bytes == (min(4 * 11, 30) + min(4 * 9, 20)) * 4
    assert server.deliver(1).download_bytes == 0  # now it is up to date


def test_metrics_truncation_drops_an_unfinished_round(tmp_path):
    lines = [
        {"type": "client", "round": 1},
        {"type": "round", "round": 1},
        {"type": "client", "round": 2},
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"type": "cl'
    )
    folder = RunFolder(tmp_path)
    assert len(folder.read_metrics()) == 3
    folder.truncate_metrics(1)
    assert [r["round"] for r in folder.read_metrics()] == [1, 1]


def test_report_files(tmp_path):
    records = [
        {
            "type": "client",
            "round": 1,
            "client": 0,
            "loss": 2.0,
            "num_examples": 5,
            "bytes_up": 10,
            "bytes_down": 0,
        },
        {
            "type": "round",
            "round": 1,
            "train_loss": 2.0,
            "bytes_up": 10,
            "bytes_down": 0,
            "round_seconds": 3.0,
            "eval": {"suites": {"test": {"accuracy": 0.5}}, "loss": 1.5},
        },
        {
            "type": "round",
            "round": 2,
            "train_loss": 1.5,
            "bytes_up": 10,
            "bytes_down": 20,
            "round_seconds": 3.0,
            "eval": {"suites": {"test": {"accuracy": 0.75}}, "loss": 1.2},
        },
    ]
    results = write_report(
        tmp_path,
        records,
        {"method": "RB-LoRA", "global_model": "m", "num_clients": 1, "client_ranks_resolved": [4]},
    )
    assert results["final"]["test/accuracy"] == 0.75
    assert results["total_bytes_down"] == 20
    assert "| 2 | 1.5000 |" in (tmp_path / "summary.md").read_text()
    for name in ("accuracy.png", "loss.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").read_text() == "x"


def test_eval_subset_is_seeded_ordered_and_spread():
    from rblora.tasks.base import seeded_subset as _subset

    values = [f"task{i // 10}-{i}" for i in range(100)]  # ordered by category, like global_test
    picked = _subset(values, 20, seed=3)
    assert picked == _subset(values, 20, seed=3) != _subset(values, 20, seed=4)
    assert len(picked) == 20 and picked == sorted(picked, key=values.index)
    assert len({v.split("-")[0] for v in picked}) > 5  # not a prefix of one or two categories
    assert _subset(values[:5], 20, seed=3) == values[:5]


def test_tensor_bytes_counts_stored_elements():
    from rblora.protocol.types import tensor_bytes

    assert tensor_bytes([torch.zeros(4, 32), torch.zeros(16, 4)]) == 4 * (128 + 64)
    assert tensor_bytes([torch.zeros(4, 32, dtype=torch.bfloat16)]) == 2 * 128


def test_a_run_header_lists_few_clients_and_summarises_thousands():
    from rblora.federation.setup import _listing

    assert _listing([4, 8, 16]) == "[4, 8, 16]"
    ranks = [4, 4, 16, 16, 64, 64, 128, 128, 256, 256] * 1000
    assert _listing(ranks) == (
        "4 for 2000 clients, 16 for 2000 clients, 64 for 2000 clients, 128 for 2000 clients, "
        "256 for 2000 clients"
    )
    sizes = [3 + k % 19 for k in range(10_000)]  # 19 distinct sizes
    assert _listing(sizes) == f"10000 values from 3 to 21 (median 12, total {sum(sizes)})"
