"""A client's own kept factors (FedSA-LoRA's B): one file per client and round; a round reads
the newest before it, and writing keeps that start, so a redone round reads the same."""

from __future__ import annotations

import pytest
import torch

from rblora.federation.client_state import LocalFactors, node_store, run_store


def _factors(value: float) -> dict:
    return {"m.q": (torch.zeros(2, 3), torch.full((4, 2), value)), "m.v": (torch.zeros(2, 3),
            torch.full((5, 2), -value))}  # fmt: skip


def test_a_round_reads_the_newest_earlier_round_and_a_redone_round_reads_it_again(tmp_path):
    store = LocalFactors(tmp_path, ("B",))
    assert store.load(0, 1) is None  # never trained: B starts at zero (the caller's)
    store.save(0, 1, _factors(1.0))
    store.save(0, 3, _factors(3.0))  # client 0 sat round 2 out
    assert torch.equal(store.load(0, 2)["m.q"], torch.full((4, 2), 1.0))
    assert torch.equal(store.load(0, 4)["m.v"], torch.full((5, 2), -3.0))
    assert set(store.load(0, 4)) == {"m.q", "m.v"}
    store.save(0, 4, _factors(4.0))  # keeps round 3 (round 4's start), drops round 1
    names = sorted(p.name for p in (tmp_path / "client_0").iterdir())
    assert names == ["round_3.safetensors", "round_4.safetensors"]
    store.save(0, 4, _factors(9.0))  # round 4 redone after a resume: it started from round 3
    assert torch.equal(store.load(0, 5)["m.q"], torch.full((4, 2), 9.0))
    assert torch.equal(store.load(0, 4)["m.q"], torch.full((4, 2), 3.0))
    assert store.load(1, 5) is None  # another client's state is its own


def test_a_damaged_file_is_named(tmp_path):
    store = LocalFactors(tmp_path, ("B",))
    store.save(2, 1, _factors(1.0))
    (tmp_path / "client_2" / "round_1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"client_2/round_1.safetensors: the client's kept"):
        store.load(2, 2)


def test_stores_exist_only_for_a_method_with_a_local_factor(tmp_path):
    assert run_store(tmp_path, ()) is None and node_store(tmp_path, "run", ()) is None
    assert run_store(tmp_path, ("B",)).folder == tmp_path / "client_state"
    a, b = node_store(tmp_path, "run a", ("B",)), node_store(tmp_path, "run b", ("B",))
    assert a.folder.parent == tmp_path and a.folder != b.folder
