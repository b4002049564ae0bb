"""--eval_personalized: each client's own model (the global update at its rank, what it starts
its next round from) scored on its own held-out split, mean/sd/count beside the global figure;
off, nothing of it runs."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from run_helpers import adapter_tensors, lm_argv, metrics
from tiny_models import build_tiny_vit

from rblora.data.prepare import main as prepare_main
from rblora.federation import cli, personal
from rblora.federation.results import scalar_evals


def test_summary_arithmetic_by_hand():
    per_client = {0: {"accuracy": 0.5, "loss": 1.0}, 2: {"accuracy": 1.0, "loss": 3.0}}
    assert personal.summarize(per_client) == {
        "clients": 2, "accuracy_mean": 0.75, "accuracy_sd": 0.25, "loss_mean": 2.0, "loss_sd": 1.0,
    }  # fmt: skip
    assert personal.summarize({1: {"loss": 2.5}}) == {"clients": 1, "loss_mean": 2.5, "loss_sd": 0}
    assert personal.summarize({}) == {"clients": 0}
    flat = scalar_evals({"personalized": {"clients": 2, "accuracy_mean": 0.75, "seconds": 3.0}})
    assert flat == {"personalized/accuracy_mean": 0.75, "personalized/clients": 2.0}


def test_capped_sample_is_seeded_and_within_the_participants():
    every = list(range(10))
    assert personal.chosen_clients(every, 0, 1, 3) == every
    assert personal.chosen_clients([4, 2], 5, 1, 3) == [2, 4]
    a = personal.chosen_clients(every, 3, 1, 3)
    assert a == personal.chosen_clients(every, 3, 1, 3) and len(a) == 3 and set(a) <= set(every)


@pytest.mark.parametrize(
    ("figures", "message"),
    [
        ({"accuracy": 1.5}, "accuracy 1.5 must be in"),
        ({"loss": float("nan")}, "not a finite number"),
        ({"loss": -1.0}, "loss -1.0 must be >= 0"),
        ({"secret": 0.1}, "unknown personalised figure 'secret'"),
        ([0.3], "must be a mapping"),
        ({"examples": 0}, "examples 0 must be an integer >= 1"),
    ],
)
def test_a_nodes_figures_are_checked(figures, message):
    with pytest.raises(ValueError, match=message):
        personal.check_figures(figures, "node 7 (client 1)")
    assert personal.check_figures({"accuracy": 1, "loss": 0.2}, "x") == {
        "accuracy": 1.0,
        "loss": 0.2,
    }


def test_each_client_is_scored_with_its_own_rank_of_the_global_update(
    local_ws, tmp_path, monkeypatch
):
    seen = {}
    original = personal.score_client

    def spy(task, spec, start, plan, *, round_, local=None):
        assert local is None  # RB-LoRA's clients keep no factor of their own
        figures = original(task, spec, start, plan, round_=round_, local=local)
        seen[round_, spec.client_id] = (spec, start.factors, figures)
        return figures

    monkeypatch.setattr(personal, "score_client", spy)
    argv = lm_argv(local_ws, tmp_path, "--eval_personalized", reduction_method="svd")
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    rounds = {r["round"]: r for r in metrics(run) if r["type"] == "round"}
    for t in (1, 2):
        p = rounds[t]["eval"]["personalized"]
        figures = {k: seen[t, k][2] for k in range(3)}
        assert p["clients"] == 3 and "accuracy_mean" not in p  # Dolly records: no choices
        for name in ("loss",):
            values = [figures[k][name] for k in range(3)]
            assert math.isclose(p[f"{name}_mean"], statistics.fmean(values), rel_tol=1e-12)
            assert math.isclose(p[f"{name}_sd"], statistics.pstdev(values), abs_tol=1e-12)
        # beside the global figure, in the round's flattened figures
        assert {"dev/accuracy", "personalized/loss_mean"} <= set(scalar_evals(rounds[t]["eval"]))
        # what each client holds: the best rank-r approximation of the round's global update
        glob = adapter_tensors(run / f"round_{t}" / "global")
        for k, rank in enumerate((2, 4, 8)):
            spec, factors, _ = seen[t, k]
            for module, (a, b) in factors.items():
                assert a.shape[0] == rank
                key = f"base_model.model.{module}.lora_A.weight"
                dw = glob[key.replace("lora_A", "lora_B")].double() @ glob[key].double()
                u, s, vh = torch.linalg.svd(dw)
                best = (u[:, :rank] * s[:rank]) @ vh[:rank]
                mine = spec.scale(rank) * b.double() @ a.double()
                assert torch.allclose(mine, best, atol=1e-5 * float(best.norm()))
    losses = {seen[2, k][2]["loss"] for k in range(3)}
    assert len(losses) == 3  # three ranks, three data sets: three personalised figures


def test_option_off_scores_nobody_and_records_nothing(local_ws, tmp_path, monkeypatch):
    from rblora.tasks.lm import CausalLMTask

    def never(*_, **__):
        raise AssertionError("evaluate_local called without --eval_personalized")

    monkeypatch.setattr(CausalLMTask, "evaluate_local", never)
    assert cli.main(lm_argv(local_ws, tmp_path)) == 0
    for r in metrics(tmp_path / "3"):
        assert "personalized" not in (r.get("eval") or {})


def test_capped_run_scores_the_sample(local_ws, tmp_path):
    argv = lm_argv(local_ws, tmp_path, "--eval_personalized", "--eval_personalized_clients", "2")
    assert cli.main(argv) == 0
    for r in metrics(tmp_path / "3"):
        if r["type"] == "round":
            assert r["eval"]["personalized"]["clients"] == 2


def test_without_local_tests_one_line_names_the_option(workspace, tmp_path, capsys):
    assert cli.main(lm_argv(workspace, tmp_path, "--eval_personalized")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--local_test_frac" in err[0] and "no local test splits" in err[0]
    assert not (tmp_path / "3").exists()


def test_the_cap_without_the_option_is_refused_in_one_line(local_ws, tmp_path, capsys):
    assert cli.main(lm_argv(local_ws, tmp_path, "--eval_personalized_clients", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "applies to --eval_personalized only" in err[0]


def test_under_dp_the_figures_stay_in_the_private_records(local_ws, tmp_path):
    """They are statistics of the clients' own held-out data: a DP run computes them, keeps
    them in private/metrics.jsonl and releases nothing of them (FedSA-LoRA: its kept B under
    private/ too)."""
    import json

    from rblora.federation.rounds import RELEASED

    dp = ["--dp_clip", "0.5", "--dp_noise_multiplier", "0.8", "--method", "FedSA"]
    assert cli.main(lm_argv(local_ws, tmp_path, "--eval_personalized", *dp)) == 0
    run = tmp_path / "3"
    for r in metrics(run):
        assert set(r) <= set(RELEASED) and "personalized" not in r.get("eval", {})
    private = [json.loads(x) for x in (run / "private" / "metrics.jsonl").read_text().splitlines()]
    kept = [r["personalized"] for r in private if r["type"] == "round"]
    assert [p["clients"] for p in kept] == [3, 3] and all(p["loss_mean"] > 0 for p in kept)
    assert (run / "private" / "client_state" / "client_0").is_dir()
    assert not (run / "client_state").exists()
    assert "personalized" not in (run / "results.json").read_text()


def test_image_task_personalised_figures(tmp_path):
    build_tiny_vit(tmp_path / "vit")
    argv = ["3", "--source", "digits", "--partition", "iid", "--pool_size", "120"]
    argv += ["--test_per_category", "4", "--local_test_frac", "0.2"]
    assert prepare_main([*argv, "--output_dir", str(tmp_path / "data")]) == 0
    options = {
        "global_model": tmp_path / "vit", "data_path": tmp_path / "data", "output_dir": tmp_path,
        "num_clients": 3, "client_ranks": "2,4,8", "num_communication_rounds": 1,
        "local_num_epochs": 1, "local_batch_size": 16, "local_micro_batch_size": 8,
        "local_learning_rate": 1e-2, "bf16": "false", "seed": 5,
    }  # fmt: skip
    run = [part for key, value in options.items() for part in (f"--{key}", str(value))]
    assert cli.main([*run, "--no_progress", "--eval_personalized"]) == 0
    (line,) = [r for r in metrics(tmp_path / "3") if r["type"] == "round"]
    p = line["eval"]["personalized"]
    assert p["clients"] == 3 and 0 <= p["accuracy_mean"] <= 1 and p["loss_mean"] > 0


def test_trackers_get_the_personalised_figures(local_ws, tmp_path):
    from run_helpers import tb_scalars

    argv = lm_argv(local_ws, tmp_path, "--eval_personalized", "--report_to", "tensorboard")
    assert cli.main(argv) == 0
    scalars = tb_scalars(tmp_path / "3" / "tensorboard")
    rounds = {r["round"]: r for r in metrics(tmp_path / "3") if r["type"] == "round"}
    for name in ("personalized/loss_mean", "personalized/loss_sd", "personalized/clients"):
        steps = dict(scalars[name])
        key = name.split("/")[1]
        assert steps == pytest.approx({t: rounds[t]["eval"]["personalized"][key] for t in (1, 2)})


def test_a_negative_cap_is_refused_in_one_line(local_ws, tmp_path, capsys):
    extra = ["--eval_personalized", "--eval_personalized_clients", "-1"]
    assert cli.main(lm_argv(local_ws, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval_personalized_clients -1 must be >= 0" in err[0]
