"""Client-level DP in a run: options, the accountant's epsilon per round, the global folders,
resume, and the results (rblora.federation.privacy, FederatedServer with privacy)."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from run_helpers import (
    adapter_tensors,
    assert_refused_in_one_line,
    killed_in_round_2,
    lm_argv,
    metrics,
    spy_evaluated_logits,
)

from rblora.federation import cli
from rblora.federation.privacy import epsilon_after, privacy_settings, solve_noise_multiplier

DP = ("--dp_clip", "0.5", "--dp_noise_multiplier", "0.8")


def _opacus_epsilon(z, q, rounds, delta, accountant="rdp"):
    """The library's own value, stepped here independently of rblora."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_is_the_librarys_for_the_same_q_z_t_delta(accountant):
    for q, z, rounds in ((1.0, 1.1, 5), (0.3, 0.9, 12)):
        got = epsilon_after(accountant, z, q, rounds, 1e-5)
        assert got == pytest.approx(_opacus_epsilon(z, q, rounds, 1e-5, accountant), rel=1e-9)
    assert epsilon_after("rdp", 0.0, 1.0, 3, 1e-5) is None  # no noise: no guarantee


def test_noise_is_solved_for_a_budget_and_an_unreachable_one_is_refused():
    settings = privacy_settings(
        clip=1.0, noise_multiplier=None, epsilon=4.0, delta=1e-5, accountant="rdp",
        sample_rate=0.5, rounds=20,
    )  # fmt: skip
    spent = _opacus_epsilon(settings.noise_multiplier, 0.5, 20, 1e-5)
    assert 4.0 - 0.01 <= spent <= 4.0
    with pytest.raises(ValueError, match=r"dp_epsilon 0.05 at delta 1e-05 cannot be met in 20"):
        solve_noise_multiplier(0.05, 1e-5, 1.0, 20, "rdp")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--dp_clip", "0", "--dp_noise_multiplier", "1"], "dp_clip 0.0 must be a finite number"),
        (["--dp_clip", "1", "--dp_noise_multiplier", "-1"], "dp_noise_multiplier -1.0 must be"),
        (["--dp_clip", "1"], "give exactly one of --dp_noise_multiplier z and --dp_epsilon E"),
        (
            ["--dp_clip", "1", "--dp_noise_multiplier", "1", "--dp_epsilon", "3"],
            "give exactly one of",
        ),
        (["--dp_noise_multiplier", "1"], "need --dp_clip C"),
        (["--dp_clip", "1", "--dp_epsilon", "0"], "dp_epsilon 0.0 must be a finite number > 0"),
        (["--dp_clip", "1", "--dp_epsilon", "3", "--dp_delta", "1"], "dp_delta 1.0 must be in"),
        (["--dp_clip", "1", "--dp_epsilon", "3", "--dp_accountant", "gdp"], "valid are rdp, prv"),
        (["--dp_clip", "1", "--dp_epsilon", "0.05"], "cannot be met in 2 rounds"),
        (
            [
                "--dp_clip",
                "1",
                "--dp_epsilon",
                "3",
                "--method",
                "FLoRA",
                "--reduction_method",
                "truncate",
            ],
            "truncate cannot be made differentially private",
        ),  # fmt: skip
    ],
)
def test_bad_dp_options_exit_2_in_one_line(workspace, tmp_path, extra, fragment, capsys):
    assert_refused_in_one_line(workspace, tmp_path / "out", extra, fragment, capsys)


def test_missing_opacus_is_one_clear_message(workspace, tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_opacus(name, *args, **kwargs):
        if name.startswith("opacus"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opacus)
    assert cli.main(lm_argv(workspace, tmp_path, *DP)) == 2
    err = capsys.readouterr().err
    assert "needs opacus" in err and "pip install 'rblora[dp]'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "method, reduction", [("RB-LoRA", "svd"), ("FLoRA", "merge"), ("Uniform HETLoRA", "truncate")]
)
def test_dp_run_records_epsilon_and_its_global_folders_load_with_peft(
    workspace, tmp_path, monkeypatch, method, reduction
):
    """Each round's global folder, loaded with PeftModel on the original base, gives the noised
    model the round evaluated; metrics, results.json and summary.md carry epsilon."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.tensor([[5, 17, 33, 40, 8, 61, 12]])
    evaluated = spy_evaluated_logits(monkeypatch, probe)
    argv = lm_argv(workspace, tmp_path, "--method", method, "--reduction_method", reduction, *DP)
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    rounds = [r for r in metrics(run) if r["type"] == "round"]
    for r in rounds:
        assert r["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.8, 1.0, r["round"], 1e-5))
        assert 0 <= r["dp_clipped"] <= 3
        # the median term norm before clipping: above C exactly when most of the 3 were clipped
        assert r["dp_norm_median"] > 0
        assert (r["dp_clipped"] >= 2) == (r["dp_norm_median"] > 0.5)
    for t in (1, 2):
        base = AutoModelForCausalLM.from_pretrained(workspace / "model")
        reloaded = PeftModel.from_pretrained(base, run / f"round_{t}" / "global").eval()
        with torch.no_grad():
            logits = reloaded(probe).logits
        torch.testing.assert_close(logits, evaluated[t], rtol=1e-4, atol=1e-4)
    results = json.loads((run / "results.json").read_text())
    assert results["privacy"]["epsilon"] == rounds[-1]["dp_epsilon"]
    assert results["privacy"]["noise_multiplier"] == 0.8
    assert "client-level DP: epsilon" in (run / "summary.md").read_text()
    assert "| DP epsilon |" in (run / "summary.md").read_text()


@pytest.mark.slow  # four runs
def test_noise_changes_the_global_model_and_is_seeded(workspace, tmp_path):
    runs = {}
    for name, extra in (
        ("clip", ("--dp_clip", "1e9", "--dp_noise_multiplier", "0")),
        ("noise", DP),
        ("noise_again", DP),
    ):
        assert cli.main(lm_argv(workspace, tmp_path / name, *extra)) == 0
        runs[name] = adapter_tensors(tmp_path / name / "3" / "round_1" / "global")
    plain_dir = tmp_path / "plain"
    assert cli.main(lm_argv(workspace, plain_dir)) == 0
    plain = adapter_tensors(plain_dir / "3" / "round_1" / "global")
    for key in runs["noise"]:
        assert torch.equal(runs["noise"][key], runs["noise_again"][key])
    # no clipping, no noise, everyone selected: the same update as without DP (held dense)
    for key in [k for k in plain if "lora_B" in k]:
        module = key.split(".lora_B")[0]
        a_key = key.replace("lora_B", "lora_A")
        ref = plain[key] @ plain[a_key]
        torch.testing.assert_close(runs["clip"][key] @ runs["clip"][a_key], ref,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        noisy = runs["noise"][key] @ runs["noise"][a_key]
        assert not torch.allclose(noisy, ref, atol=1e-3), module


@pytest.mark.slow  # six runs
def test_killed_and_resumed_dp_run_ends_bitwise_like_an_uninterrupted_one(
    workspace, tmp_path, monkeypatch
):
    for method in ("RB-LoRA", "FLoRA"):
        full, cut = tmp_path / method / "full", tmp_path / method / "cut"
        assert cli.main(lm_argv(workspace, full, "--method", method, *DP)) == 0
        assert (
            killed_in_round_2(monkeypatch, lm_argv(workspace, cut, "--method", method, *DP)) == 130
        )
        assert cli.main(lm_argv(workspace, cut, "--method", method, *DP, "--resume")) == 0
        for sub in ["round_2/global", "round_2/client_0", "round_2/client_2"]:
            a, b = adapter_tensors(full / "3" / sub), adapter_tensors(cut / "3" / sub)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (method, sub, key)
        eps = [r["dp_epsilon"] for r in metrics(cut / "3") if r["type"] == "round"]
        assert eps == [r["dp_epsilon"] for r in metrics(full / "3") if r["type"] == "round"]


def test_dp_options_cannot_change_on_resume(workspace, tmp_path, capsys):
    eps = ("--dp_clip", "0.5", "--dp_epsilon", "30")
    assert cli.main(lm_argv(workspace, tmp_path, *eps, num_communication_rounds=1)) == 0
    capsys.readouterr()
    changed = ("--dp_clip", "0.7", "--dp_epsilon", "30")
    assert cli.main(lm_argv(workspace, tmp_path, *changed, "--resume",
                            num_communication_rounds=1)) == 2  # fmt: skip
    assert "dp_clip: run has 0.5, now 0.7" in capsys.readouterr().err
    assert cli.main(lm_argv(workspace, tmp_path, *eps, "--resume")) == 2  # 2 rounds now
    assert "noise was solved for the run's rounds" in capsys.readouterr().err


def test_a_dp_comparison_shows_the_epsilon_spent(workspace, tmp_path):
    """DP options after ``--`` are a cell option like any other; comparison.md says the epsilon
    each row spent by the last round."""
    from rblora.cli import main as rblora

    root = tmp_path / "cmp"
    base = lm_argv(workspace, tmp_path / "unused", *DP, num_communication_rounds=2)
    i = base.index("--output_dir")
    del base[i : i + 2]
    argv = ["compare", "--methods", "RB-LoRA", "--seeds", "1", "--output_dir", str(root), "--"]
    assert rblora([*argv, *base]) == 0
    table = (root / "comparison.md").read_text()
    assert "| setting | method | seeds | DP epsilon r2 |" in table
    spent = _opacus_epsilon(0.8, 1.0, 2, 1e-5)
    assert f"| heterogeneous | RB-LoRA | 1 | {spent:.3g} |" in table


@pytest.mark.parametrize(
    "private, round_, advice",
    [
        (True, 2, "the start carried the DP noise of the last global model"),
        (True, 1, "(lower --local_learning_rate and start again)"),  # round 1: no noise yet
        (False, 2, "(lower --local_learning_rate and start again)"),
    ],
)
def test_a_client_diverging_from_a_noised_start_is_told_why(private, round_, advice):
    """Under DP a client's start after round 1 carries the noise; a divergence then says so
    rather than blaming the learning rate alone."""
    from rblora.federation.rounds import RunError, train_client
    from rblora.protocol.types import ClientSpec
    from rblora.training import TrainingDiverged

    class Diverges:
        def train_client(self, spec, start, *, seed, round_):
            raise TrainingDiverged("diverged at step 2: the loss rose from 11 to 19")

    with pytest.raises(RunError) as err:
        train_client(Diverges(), ClientSpec(0, 4, 16.0), None, seed=0, round_=round_,
                     private=private)  # fmt: skip
    assert f"client 0 (rank 4) in round {round_}: training diverged at step 2" in str(err.value)
    assert advice in str(err.value)
