"""``--report_to tensorboard,mlflow`` on the tiny language model: what the event files and the
MLflow store hold, read back with their own readers; resume, failures, bad values."""

from __future__ import annotations

import json
import sys

import pytest
from run_helpers import lm_argv, metrics, tb_scalars

from rblora.federation import cli, tracking
from rblora.federation.options import report_targets
from rblora.tasks.lm import CausalLMTask

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def sqlite(folder) -> str:
    return f"sqlite:///{(folder / 'mlflow.db').as_posix()}"


def mlflow_runs(out, experiment=None, uri=None):
    """The runs of an experiment (default: named after ``out``) in a store (default: ``out``'s)."""
    client = mlflow.MlflowClient(tracking_uri=uri or sqlite(out))
    found = client.get_experiment_by_name(experiment or out.name)
    return client, client.search_runs([found.experiment_id])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the tests that do not check the default one (each new store spends
    seconds creating its tables); each test uses its own experiment in it."""
    uri = sqlite(tmp_path_factory.mktemp("store"))
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def in_store(store, name) -> tuple[str, ...]:
    return ("--mlflow_tracking_uri", store, "--mlflow_experiment", name)


def history(client, run, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """What the trackers should hold, from metrics.jsonl: a few figures per round."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in metrics(run_dir):
        if r["type"] == "client":
            out.setdefault(f"client_{r['client']}/loss", []).append((r["round"], r["loss"]))
            out.setdefault(f"client_{r['client']}/bytes_up", []).append((r["round"], r["bytes_up"]))
        else:
            out.setdefault("dev/accuracy", []).append(
                (r["round"], r["eval"]["suites"]["dev"]["accuracy"])
            )
            out.setdefault("heldout/loss", []).append((r["round"], r["eval"]["loss"]))
            out.setdefault("round/round_seconds", []).append((r["round"], r["round_seconds"]))
            if r["round"]:
                out.setdefault("round/train_loss", []).append((r["round"], r["train_loss"]))
                out.setdefault("round/bytes_down", []).append((r["round"], r["bytes_down"]))
    return out


def assert_holds(got: dict[str, list[tuple[int, float]]], want, rel=1e-6):
    for key, values in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in values], key  # each step once
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in values], rel=rel), key


def test_every_round_goes_to_tensorboard_and_mlflow(workspace, tmp_path):
    out = tmp_path / "exp"
    argv = lm_argv(workspace, out, "--eval_base", "--report_to", "tensorboard,mlflow")
    assert cli.main(argv) == 0
    run_dir = out / "3"
    want = expected(run_dir)
    assert [s for s, _ in want["dev/accuracy"]] == [0, 1, 2]  # the base model is step 0
    assert [s for s, _ in want["client_2/loss"]] == [1, 2]

    scalars = tb_scalars(run_dir / "tensorboard")
    assert_holds(scalars, want, rel=1e-6)  # event files store float32

    client, runs = mlflow_runs(out)  # the experiment is named after --output_dir
    assert len(runs) == 1
    # artifacts (none are logged) would go beside the store, not into the working folder
    assert client.get_experiment_by_name(out.name).artifact_location == (
        (out / "mlartifacts").resolve().as_uri()
    )
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "RB-LoRA/seed3"
    tags = run.data.tags
    assert (tags["method"], tags["seed"], tags["ranks"], tags["task"]) == (
        "RB-LoRA",
        "3",
        "2,4,8",
        "lm",
    )
    assert tags["run_folder"] == str(run_dir.resolve())
    params = run.data.params
    assert params["method"] == "RB-LoRA" and params["num_communication_rounds"] == "2"
    assert json.loads(params["client_ranks_resolved"]) == [2, 4, 8]
    assert_holds({k: history(client, run, k) for k in want}, want, rel=1e-12)
    assert set(run.data.metrics) == set(scalars)  # the same names in both trackers
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["mlflow"]["run_id"] == run.info.run_id


def test_report_to_none_writes_nothing(workspace, tmp_path):
    assert cli.main(lm_argv(workspace, tmp_path, num_communication_rounds=1)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]  # no mlflow.db
    assert not (tmp_path / "3" / "tensorboard").exists()
    assert not (tmp_path / "3" / "tracking.json").exists()


def test_a_bad_report_to_value_is_one_line_naming_it(workspace, tmp_path, capsys):
    assert cli.main(lm_argv(workspace, tmp_path, "--report_to", "tensorboard,wandb")) == 2
    err = capsys.readouterr().err
    assert err == (
        "train.py: error: report_to 'wandb': valid are tensorboard, mlflow, all, none (several "
        "separated by commas, e.g. tensorboard,mlflow)\n"
    )
    assert not tmp_path.joinpath("3").exists()


@pytest.mark.parametrize(
    "target, module, package",
    [("mlflow", "mlflow", "mlflow-skinny"), ("tensorboard", "tensorboard", "tensorboard")],
)
def test_a_missing_package_is_named_before_anything_runs(
    workspace, tmp_path, capsys, monkeypatch, target, module, package
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert cli.main(lm_argv(workspace, tmp_path, "--report_to", f"all,{target}")) == 2
    assert capsys.readouterr().err == (
        f"train.py: error: --report_to {target} needs the {package} package: pip install "
        "'rblora[tracking]' (or leave out --report_to)\n"
    )
    assert not any(tmp_path.iterdir())  # nothing written, not even the run lock


def test_targets():
    assert report_targets(["none"]) == report_targets([]) == []
    assert report_targets(["all"]) == ["tensorboard", "mlflow"]
    assert report_targets(["MLflow", "tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]
    with pytest.raises(ValueError, match=r"report_to none,mlflow: 'none' cannot be combined"):
        report_targets(["none", "mlflow"])


def test_a_killed_run_resumes_in_the_same_trackers_without_a_step_twice(
    workspace, tmp_path, monkeypatch, capsys, store
):
    out = tmp_path / "exp"
    report = ("--eval_base", "--report_to", "tensorboard,mlflow", *in_store(store, "killed"))
    original = CausalLMTask.train_client

    def dies_in_round_2(self, spec, start, *, seed, round_):
        if round_ == 2 and spec.client_id == 1:
            raise KeyboardInterrupt
        return original(self, spec, start, seed=seed, round_=round_)

    monkeypatch.setattr(CausalLMTask, "train_client", dies_in_round_2)
    assert cli.main(lm_argv(workspace, out, *report)) == 130
    monkeypatch.setattr(CausalLMTask, "train_client", original)
    client, runs = mlflow_runs(out, "killed", store)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert [s for s, _ in history(client, runs[0], "client_0/loss")] == [1]  # round 2: not sent

    # more rounds on resume; the trackers are changeable options (here: the same)
    resume = lm_argv(workspace, out, *report, "--resume", num_communication_rounds=3)
    assert cli.main(resume) == 0
    assert "--report_to mlflow: continuing run " + runs[0].info.run_id in capsys.readouterr().err
    client, runs = mlflow_runs(out, "killed", store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    want = expected(out / "3")
    assert [s for s, _ in want["dev/accuracy"]] == [0, 1, 2, 3]
    assert_holds({k: history(client, runs[0], k) for k in want}, want, rel=1e-12)
    assert_holds(tb_scalars(out / "3" / "tensorboard"), want)


def test_a_process_killed_while_sending_a_round_sends_it_again_once(
    workspace, tmp_path, monkeypatch, store
):
    """Killed after round 2's checkpoint, halfway through its TensorBoard scalars (before
    MLflow got it): the resumed run sends round 2 to both again, and TensorBoard shows each of
    its steps once (the partial events are purged)."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "exp"
    report = ("--report_to", "tensorboard,mlflow", *in_store(store, "sending"))
    real = SummaryWriter.add_scalar

    def dies_at_the_marker(self, tag, value, global_step=None, **kw):
        if tag == tracking.MARKER and global_step == 2:
            raise KeyboardInterrupt
        return real(self, tag, value, global_step=global_step, **kw)

    monkeypatch.setattr(SummaryWriter, "add_scalar", dies_at_the_marker)
    assert cli.main(lm_argv(workspace, out, *report)) == 130
    monkeypatch.undo()
    assert [r["round"] for r in metrics(out / "3") if r["type"] == "round"] == [1, 2]
    partial = tb_scalars(out / "3" / "tensorboard")
    assert partial["client_0/loss"][-1][0] == 2 and len(partial[tracking.MARKER]) == 1

    assert cli.main(lm_argv(workspace, out, *report, "--resume")) == 0
    want = expected(out / "3")
    assert_holds(tb_scalars(out / "3" / "tensorboard"), want)
    client, runs = mlflow_runs(out, "sending", store)
    assert_holds({k: history(client, runs[0], k) for k in want}, want, rel=1e-12)


def test_a_tracker_that_fails_gets_the_round_later_and_training_goes_on(
    workspace, tmp_path, monkeypatch, capsys, store
):
    out = tmp_path / "exp"
    real = mlflow.MlflowClient.log_batch
    calls = {"metrics": 0}

    def down_once(self, run_id, metrics=(), **kw):
        if metrics:
            calls["metrics"] += 1
            if calls["metrics"] == 1:  # round 1's figures
                raise mlflow.exceptions.MlflowException("tracking server unavailable")
        return real(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down_once)
    assert cli.main(lm_argv(workspace, out, "--report_to", "mlflow", *in_store(store, "down"))) == 0
    err = capsys.readouterr().err
    assert (
        "warning: --report_to mlflow: round(s) 1..1 not sent (MlflowException: tracking server "
        "unavailable); sent again after the next round" in err
    )
    client, runs = mlflow_runs(out, "down", store)
    want = expected(out / "3")
    assert_holds({k: history(client, runs[0], k) for k in want}, want, rel=1e-12)


def test_a_tracker_turned_on_when_resuming_gets_the_whole_history(workspace, tmp_path, store):
    out = tmp_path / "exp"
    assert cli.main(lm_argv(workspace, out, "--eval_base", num_communication_rounds=1)) == 0
    argv = lm_argv(workspace, out, "--eval_base", "--resume", "--report_to", "all")
    assert cli.main([*argv, *in_store(store, "later")]) == 0
    want = expected(out / "3")
    assert [s for s, _ in want["dev/accuracy"]] == [0, 1, 2]
    assert_holds(tb_scalars(out / "3" / "tensorboard"), want)
    client, runs = mlflow_runs(out, "later", store)
    assert_holds({k: history(client, runs[0], k) for k in want}, want, rel=1e-12)


def test_mlflow_options_name_the_store_experiment_and_tags(workspace, tmp_path, store):
    argv = lm_argv(workspace, tmp_path, "--report_to", "mlflow", num_communication_rounds=1)
    argv += [*in_store(store, "ranks study"), "--mlflow_tags", '{"owner": "me", "setting": "x"}']
    assert cli.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]  # not the default store
    _, runs = mlflow_runs(tmp_path, "ranks study", store)
    assert runs[0].data.tags["owner"] == "me" and runs[0].info.run_name == "x/RB-LoRA/seed3"


def test_a_store_that_cannot_be_used_stops_the_run_and_resume_goes_on(
    workspace, tmp_path, capsys, store
):
    argv = lm_argv(workspace, tmp_path, "--report_to", "mlflow", num_communication_rounds=1)
    assert cli.main([*argv, "--mlflow_tracking_uri", "bogus://x"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("train.py: stopped: ValueError: --report_to mlflow: cannot use the ")
    assert "bogus://x" in err and "continue with --resume once the cause is fixed" in err
    assert not (tmp_path / "3" / "tracking.json").exists()
    assert cli.main([*argv, *in_store(store, "fixed"), "--resume"]) == 0
    client, runs = mlflow_runs(tmp_path, "fixed", store)
    assert [s for s, _ in history(client, runs[0], "dev/accuracy")] == [1]
