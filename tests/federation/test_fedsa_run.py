"""FedSA-LoRA in a whole run (in-process engine): clients train A and B, send A alone, keep
their own B from round to round (client-side state the server never reads); the server
averages A per component over its holders; there is no global model, so each client's own
model is scored (--eval_personalized)."""

from __future__ import annotations

import pytest
import torch
from run_helpers import (
    adapter_tensors,
    assert_refused_in_one_line,
    lm_argv,
    metrics,
)

from rblora.federation import cli, personal
from rblora.federation.server import FederatedServer
from rblora.tasks.lm import CausalLMTask

RANKS = (2, 4, 8)


def _factors(folder):
    tensors = adapter_tensors(folder)
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (
            a, tensors[key.replace("lora_A", "lora_B")]
        )
        for key, a in tensors.items() if key.endswith(".lora_A.weight")
    }  # fmt: skip


def fedsa_argv(ws, out, *extra):
    return lm_argv(ws, out, "--method", "FedSA", "--eval_personalized", *extra)


def test_clients_keep_their_b_send_a_and_the_server_averages_a(local_ws, tmp_path, monkeypatch):
    starts, folded = {}, []
    train, fold = CausalLMTask.train_client, FederatedServer.fold

    def spy_train(self, spec, start, *, seed, round_):
        starts[round_, spec.client_id] = start
        return train(self, spec, start, seed=seed, round_=round_)

    def spy_fold(self, update):
        out = fold(self, update)
        folded.append(out)
        return out

    monkeypatch.setattr(CausalLMTask, "train_client", spy_train)
    monkeypatch.setattr(FederatedServer, "fold", spy_fold)
    assert cli.main(fedsa_argv(local_ws, tmp_path)) == 0
    run = tmp_path / "3"
    records = {(r["round"], r["client"]): r for r in metrics(run) if r["type"] == "client"}
    rounds = {r["round"]: r for r in metrics(run) if r["type"] == "round"}
    trained = {t: [_factors(run / f"round_{t}" / f"client_{k}") for k in range(3)] for t in (1, 2)}
    sizes = [records[1, k]["num_examples"] for k in range(3)]
    # the server never holds a client's B: what it folds in has zeros there
    assert len(folded) == 6 and all(not b.any() for u in folded for _, b in u.factors.values())
    glob = _factors(run / "round_1" / "global")
    for module, (a_g, b_g) in glob.items():
        # A: per component the mean over the clients that hold it, weighted by examples
        want = torch.zeros_like(a_g, dtype=torch.float64)
        den = torch.zeros(a_g.shape[0], dtype=torch.float64)
        for k, rank in enumerate(RANKS):
            want[:rank] += sizes[k] * trained[1][k][module][0].double()
            den[:rank] += sizes[k]
        torch.testing.assert_close(a_g.double(), want / den[:, None], rtol=1e-5, atol=1e-7)
        assert not b_g.any()
    for k, rank in enumerate(RANKS):
        start = starts[2, k].factors
        for module, (_, b) in trained[1][k].items():
            assert torch.equal(start[module][1], b)  # its own B of round 1, bitwise
            assert torch.equal(start[module][0], glob[module][0][:rank])  # the shared A's rows
            assert float(b.abs().max()) > 0
        a_bytes = sum(a.numel() * 4 for a, _ in trained[1][k].values())
        assert records[1, k]["bytes_up"] == records[2, k]["bytes_up"] == a_bytes
        assert (records[1, k]["bytes_down"], records[2, k]["bytes_down"]) == (0, a_bytes)
    for t in (1, 2):  # no global figure, the personalised one beside it
        assert rounds[t]["eval"]["global"].startswith("not defined")
        assert rounds[t]["eval"]["personalized"]["clients"] == 3
        assert (run / f"round_{t}" / "global" / "NOTE.md").is_file()
    # the clients' own state: under the run folder, one file per client and round
    kept = sorted(p.relative_to(run).as_posix() for p in (run / "client_state").rglob("*.*"))
    assert kept == [f"client_state/client_{k}/round_{t}.safetensors" for k in range(3)
                    for t in (1, 2)]  # fmt: skip


def test_personal_model_is_the_shared_a_with_the_clients_own_b(local_ws, tmp_path, monkeypatch):
    seen = {}
    original = personal.score_client

    def spy(task, spec, start, plan, *, round_, local=None):
        seen[round_, spec.client_id] = local
        return original(task, spec, start, plan, round_=round_, local=local)

    monkeypatch.setattr(personal, "score_client", spy)
    assert cli.main(fedsa_argv(local_ws, tmp_path)) == 0
    for t in (1, 2):
        for k in range(3):
            mine = _factors(tmp_path / "3" / f"round_{t}" / f"client_{k}")
            assert all(torch.equal(seen[t, k][m], b) for m, (_, b) in mine.items())


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--method", "FedSA-LoRA"], "FedSA-LoRA keeps each client's B on the client"),
        (["--method", "FedSA", "--eval_personalized", "--reduction_method", "svd"],
         "its clients keep their own B"),
    ],
)  # fmt: skip
def test_refused_in_one_line(local_ws, tmp_path, capsys, extra, fragment):
    assert_refused_in_one_line(local_ws, tmp_path / "out", extra, fragment, capsys)
