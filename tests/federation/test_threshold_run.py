"""FLoRIST's threshold redistribution in a whole run (in-process engine): every client starts
round 2 from the first min(k, r) SVD directions of the round-1 update, k per module."""

from __future__ import annotations

from run_helpers import lm_argv, metrics

from rblora.federation import cli
from rblora.federation.server import FederatedServer
from rblora.tasks.lm import CausalLMTask


def test_each_client_starts_from_min_k_r_directions(workspace, tmp_path, monkeypatch):
    kept, starts = {}, {}
    redistribute, train = FederatedServer.redistribute, CausalLMTask.train_client

    def spy_redistribute(self, update):
        kept[self.completed_rounds + 1] = {m: update.kept_rank(m) for m in update.modules}
        return redistribute(self, update)

    def spy_train(self, spec, start, *, seed, round_):
        if start.factors is not None:  # B's non-zero columns: the directions the start holds
            starts[round_, spec.client_id] = {
                m: int((b.abs().sum(dim=0) > 0).sum()) for m, (_, b) in start.factors.items()
            }
        return train(self, spec, start, seed=seed, round_=round_)

    monkeypatch.setattr(FederatedServer, "redistribute", spy_redistribute)
    monkeypatch.setattr(CausalLMTask, "train_client", spy_train)
    argv = lm_argv(workspace, tmp_path, "--method", "FlexLoRA")
    assert cli.main([*argv, "--reduction_method", "threshold", "--svd_energy", "0.5"]) == 0
    assert set(starts) == {(2, 0), (2, 1), (2, 2)}
    for k, rank in enumerate((2, 4, 8)):
        assert starts[2, k] == {m: min(kept[1][m], rank) for m in kept[1]}
    # the threshold cut something the widest client could have held
    assert any(k < 8 for k in kept[1].values())
    # each round's line records the kept ranks (FLoRIST's "total rank"): min(k, widest rank)
    records = metrics(tmp_path / "3")
    (first,) = [r for r in records if r["type"] == "round" and r["round"] == 1]
    expected = {m: min(k, 8) for m, k in kept[1].items()}
    assert first["threshold_rank"] == {
        "total": sum(expected.values()), "min": min(expected.values()),
        "max": max(expected.values()), "modules": expected,
    }  # fmt: skip


def test_florist_is_flexlora_with_the_threshold_cut_in_a_run(workspace, tmp_path):
    """--method FLoRIST runs with the threshold cut as its redistribution, and the round line
    says which ranks it kept."""
    assert (
        cli.main([*lm_argv(workspace, tmp_path, "--method", "FLoRIST"), "--svd_energy", "0.5"]) == 0
    )
    records = metrics(tmp_path / "3")
    rounds = [r for r in records if r["type"] == "round" and r["round"] > 0]
    assert {(r["method"], r["reduction"]) for r in rounds} == {("FLoRIST", "threshold")}
    assert all(1 <= r["threshold_rank"]["min"] <= r["threshold_rank"]["max"] <= 8 for r in rounds)
