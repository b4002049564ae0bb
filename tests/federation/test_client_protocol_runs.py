"""A method's client protocol in a whole run (in-process engine): FFA-LoRA's clients keep A
frozen at the run's shared initialisation and send B alone."""

from __future__ import annotations

import torch
from run_helpers import adapter_tensors, lm_argv, metrics

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
