"""Pieces of the round loop that need no model: export, server state, selection, reports."""

import json

import pytest
import torch

from rblora.aggregation import ClientUpdate
from rblora.federation.loop import exact_factors, read_metrics, truncate_metrics
from rblora.federation.report import write_report
from rblora.federation.server import ClientSpec, FederatedServer, derive_seed
from rblora.utils.atomic import atomic_dir, write_text


def _factors(rank, d_out=6, d_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q": (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)),
        "m.v": (torch.randn(rank, d_in, generator=g), torch.randn(4, rank, generator=g)),
    }


def test_exact_factors_keep_the_update_and_share_one_rank():
    delta = {
        "q": (torch.randn(9, 5), torch.randn(6, 9)),
        "v": (torch.randn(2, 5), torch.randn(3, 2)),
    }
    out = exact_factors(delta)
    ranks = {a.shape[0] for a, _ in out.values()}
    assert ranks == {5}  # q compressed from 9 to min(6, 5); v padded from 2 to 5
    for name, (a, b) in delta.items():
        torch.testing.assert_close(out[name][1] @ out[name][0], b @ a, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("method", ["RB-LoRA", "FLoRA", "Uniform HETLoRA"])
def test_server_state_round_trip(method):
    specs = [ClientSpec(0, 2, 16.0), ClientSpec(1, 4, 16.0)]
    server = FederatedServer(method, specs, seed=1)
    updates = [
        ClientUpdate(
            num_examples=10 * (k + 1),
            lora_alpha=16.0,
            factors=_factors(s.rank, seed=k),
            client_id=k,
        )
        for k, s in enumerate(specs)
    ]
    g = server.aggregate(updates)
    server.redistribute(g)
    tensors, meta = server.state_tensors()
    again = FederatedServer(method, specs, seed=1)
    again.load_state_tensors(dict(tensors), json.loads(json.dumps(meta)))
    assert again.completed_rounds == 1
    assert len(again.merged) == len(server.merged) == (1 if g.merges_into_base else 0)
    for k in range(2):
        assert again.download_bytes(k) == server.download_bytes(k) > 0
        start, restored = server.start_for(k), again.start_for(k)
        if start is None:
            assert restored is None
            continue
        for module, (a, b) in start.items():
            assert a.shape[0] == specs[k].rank
            assert torch.equal(restored[module][0], a) and torch.equal(restored[module][1], b)


def test_metrics_truncation_drops_an_unfinished_round(tmp_path):
    lines = [
        {"type": "client", "round": 1},
        {"type": "round", "round": 1},
        {"type": "client", "round": 2},
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"type": "cl'
    )
    assert len(read_metrics(tmp_path)) == 3
    truncate_metrics(tmp_path, 1)
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 1]


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
    from rblora.federation.cli import _subset

    values = [f"task{i // 10}-{i}" for i in range(100)]  # ordered by category, like global_test
    picked = _subset(values, 20, seed=3)
    assert picked == _subset(values, 20, seed=3) != _subset(values, 20, seed=4)
    assert len(picked) == 20 and picked == sorted(picked, key=values.index)
    assert len({v.split("-")[0] for v in picked}) > 5  # not a prefix of one or two categories
    assert _subset(values[:5], 20, seed=3) == values[:5]
