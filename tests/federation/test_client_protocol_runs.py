"""A method's client protocol in a whole run (in-process engine): FFA-LoRA's clients keep A
frozen at the run's shared initialisation and send B alone."""

from __future__ import annotations

import torch
from run_helpers import adapter_tensors, killed_in_round_2, lm_argv, metrics

from rblora.aggregation.frozen import FrozenInit
from rblora.federation import cli

SEED = 3  # lm_argv's


def _factors(folder):
    """module -> (A, B) of a saved client adapter (PEFT's key names stripped)."""
    tensors = adapter_tensors(folder)
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = (a, tensors[key.replace("lora_A", "lora_B")])
    return out


def test_ffa_lora_keeps_a_frozen_and_sends_b_alone(workspace, tmp_path):
    assert cli.main(lm_argv(workspace, tmp_path, "--method", "FFA-LoRA")) == 0
    run = tmp_path / "3"
    init = FrozenInit(SEED)
    records = {(r["round"], r["client"]): r for r in metrics(run) if r["type"] == "client"}
    for k, rank in enumerate((2, 4, 8)):
        trained = [_factors(run / f"round_{t}" / f"client_{k}") for t in (1, 2)]
        assert trained[0].keys() == trained[1].keys() and len(trained[0]) > 0
        for module, (a, b) in trained[0].items():
            # A: the first `rank` rows of the run's frozen A, bitwise, in every round
            frozen = init.rows(module, rank, a.shape[1])
            assert torch.equal(a, frozen) and torch.equal(trained[1][module][0], frozen)
            assert float(b.abs().max()) > 0 and not torch.equal(b, trained[1][module][1])
        # what travels is B alone: its bytes, up in every round, down from round 2
        b_bytes = sum(b.numel() * 4 for _, b in trained[0].values())
        a_bytes = sum(a.numel() * 4 for a, _ in trained[0].values())
        assert records[1, k]["bytes_up"] == records[2, k]["bytes_up"] == b_bytes
        assert records[1, k]["bytes_down"] == 0 and records[2, k]["bytes_down"] == b_bytes
        assert a_bytes > 0


def test_a_ffa_lora_run_resumed_in_round_2_ends_bitwise_as_an_uninterrupted_one(
    workspace, tmp_path, monkeypatch
):
    """Nothing of the protocol is state: the frozen A is drawn again from the seed after a
    resume, B's starts come from the checkpointed start basis."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main(lm_argv(workspace, full, "--method", "FFA-LoRA")) == 0
    assert killed_in_round_2(monkeypatch, lm_argv(workspace, cut, "--method", "FFA-LoRA")) == 130
    assert cli.main(lm_argv(workspace, cut, "--method", "FFA-LoRA", "--resume")) == 0
    for sub in ("round_2/global", "round_2/client_0", "round_2/client_2"):
        x, y = adapter_tensors(full / "3" / sub), adapter_tensors(cut / "3" / sub)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), sub
