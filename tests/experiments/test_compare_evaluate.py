"""rblora compare, evaluate and report on the tiny language model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from run_helpers import lm_argv, metrics

from rblora.cli import main as rblora
from rblora.experiments import compare


def _base(workspace, tmp_path):
    # output_dir and seed are set per cell; everything else is the same for every cell
    argv = lm_argv(workspace, tmp_path / "unused", num_communication_rounds=2)
    i = argv.index("--output_dir")
    del argv[i : i + 2]
    return argv


def test_compare_runs_every_cell_and_resumes(workspace, tmp_path, capsys, monkeypatch):
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "RB-LoRA,FedIT", "--seeds", "1,2"]
    argv += ["--rank_settings", "heterogeneous;smallest", "--output_dir", str(root), "--"]
    argv += _base(workspace, tmp_path)
    assert rblora(argv) == 0
    out = capsys.readouterr()
    index = json.loads((root / "compare.json").read_text())
    # FedIT needs one rank: only in "smallest"; RB-LoRA in both settings; 2 seeds each
    assert len(index["cells"]) == 6
    assert "cell 6/6: smallest / FedIT / seed 2" in out.err
    table = (root / "comparison.md").read_text()
    assert "| heterogeneous | RB-LoRA | 2 |" in table and "| smallest | FedIT | 2 |" in table
    assert "heterogeneous | FedIT" not in table
    assert "| - | base model | - |" in table  # round 0, evaluated once
    assert "dev/accuracy r1" in table and "dev/accuracy r2" in table and " ± " in table
    assert (root / "plots" / "dev_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    cell = root / "smallest" / "rb-lora" / "seed2" / "3"
    assert [r["rank"] for r in metrics(cell) if r["type"] == "client"][:3] == [2, 2, 2]
    seeds = {json.loads((root / c["path"] / "3" / "config.json").read_text())["seed"]
             for c in index["cells"]}  # fmt: skip
    assert seeds == {1, 2}

    # a killed comparison goes on where it stopped: finished cells are kept
    before = (
        (root / "heterogeneous" / "rb-lora" / "seed1" / "3" / "metrics.jsonl").stat().st_mtime_ns
    )
    (root / "smallest" / "fedit" / "seed2" / "3" / "results.json").unlink()
    assert rblora(argv) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier, kept") == 5 and "smallest / FedIT / seed 2" in err
    after = (
        (root / "heterogeneous" / "rb-lora" / "seed1" / "3" / "metrics.jsonl").stat().st_mtime_ns
    )
    assert before == after

    # report rebuilds the table from the cells
    (root / "comparison.md").unlink()
    assert rblora(["report", str(root)]) == 0
    assert (root / "comparison.md").read_text() == table


def test_a_cell_resumes_as_it_started_whatever_cells_the_call_has(workspace, tmp_path, capsys):
    # processes split a comparison by --methods (or --seeds); the first cell of each call
    # evaluates the base model, so a cell started second must not be asked to on resume
    root = tmp_path / "cmp"
    head = ["compare", "--seeds", "1", "--rank_settings", "smallest", "--output_dir", str(root)]
    train = ["--", *_base(workspace, tmp_path), "--num_communication_rounds", "1"]
    assert rblora([*head, "--methods", "RB-LoRA,FedIT", *train]) == 0
    fedit = root / "smallest" / "fedit" / "seed1" / "3"
    assert [r["round"] for r in metrics(fedit) if r["type"] == "round"] == [1]
    (fedit / "results.json").unlink()  # killed before it finished
    capsys.readouterr()
    assert rblora([*head, "--methods", "FedIT", *train]) == 0
    assert "cell 1/1: smallest / FedIT / seed 1 (resuming)" in capsys.readouterr().err
    assert json.loads((fedit / "results.json").read_text())["rounds_completed"] == 1
    assert [r["round"] for r in metrics(fedit) if r["type"] == "round"] == [1]


def test_compare_is_one_mlflow_experiment_with_one_run_per_cell(workspace, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "RB-LoRA,FedIT", "--seeds", "4"]
    argv += ["--rank_settings", "heterogeneous;smallest", "--output_dir", str(root), "--"]
    argv += [*_base(workspace, tmp_path), "--num_communication_rounds", "1"]
    assert rblora([*argv, "--report_to", "mlflow,tensorboard"]) == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert experiments.keys() == {"cmp", "Default"}  # named after the folder; MLflow's own
    assert not client.search_runs([experiments["Default"]])
    runs = client.search_runs([experiments["cmp"]])
    cells = {(r.data.tags["setting"], r.data.tags["method"], r.data.tags["seed"]) for r in runs}
    assert len(runs) == 3 and cells == {
        ("heterogeneous", "RB-LoRA", "4"), ("smallest", "RB-LoRA", "4"), ("smallest", "FedIT", "4")
    }  # fmt: skip
    assert {r.info.run_name for r in runs} >= {"smallest/FedIT/seed4"}
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "dev/accuracy")]
        path = Path(run.data.tags["run_folder"])
        assert steps == [r["round"] for r in metrics(path) if r["type"] == "round"]
        assert (path / "tensorboard").is_dir()
    # the base model (round 0) is in the first cell only
    first = root / "heterogeneous" / "rb-lora" / "seed4" / "3"
    assert [r["round"] for r in metrics(first) if r["type"] == "round"] == [0, 1]


def test_compare_refuses_bad_cells_before_running(workspace, tmp_path, capsys):
    argv = ["compare", "--methods", "RB-LoRA,head-only", "--seeds", "1"]
    argv += ["--output_dir", str(tmp_path / "cmp"), "--", *_base(workspace, tmp_path)]
    assert rblora(argv) == 2
    assert "head-only" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    assert compare.rank_settings(["smallest", "wide=1,2,3"], [2, 4, 8]) == {
        "smallest": [2, 2, 2],
        "wide": [1, 2, 3],
    }


@pytest.fixture(scope="module")
def flora_run(workspace, tmp_path_factory):
    """A finished two-round FLoRA run folder (3 clients)."""
    from rblora.federation.cli import main as train

    out = tmp_path_factory.mktemp("flora")
    assert train(lm_argv(workspace, out, "--method", "FLoRA")) == 0
    return out / "3"


def _row(table, method):
    return next(line for line in table.splitlines() if f"| {method} |" in line)


def test_a_failed_cell_is_kept_until_retried_and_cleared_when_it_finishes(
    workspace, tmp_path, capsys, monkeypatch
):
    import rblora.federation.cli as train_cli
    from rblora.federation.rounds import RunError

    real_run, ran, failing = train_cli.run, [], {"seed2"}

    def run(args, given):  # seed 2 stops like a diverged run while "seed2" is in failing
        seed = Path(args.output_dir).name
        ran.append(seed)
        if seed in failing:
            raise RunError("client 1 (rank 4) in round 1: training diverged")
        return real_run(args, given)

    monkeypatch.setattr(train_cli, "run", run)
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "RB-LoRA", "--seeds", "1,2", "--output_dir", str(root)]
    argv += ["--", *_base(workspace, tmp_path)]
    failed = root / "heterogeneous" / "rb-lora" / "seed2" / "failed.txt"
    assert rblora(argv) == 0 and ran == ["seed1", "seed2"]
    assert "training diverged" in failed.read_text()
    row = _row((root / "comparison.md").read_text(), "RB-LoRA")
    assert "| 1 (seed 2 failed: see failed.txt) |" in row

    # the next invocation keeps the failed cell as it is (a result, not re-run every time)
    failing.clear()
    ran.clear()
    assert rblora(argv) == 0 and ran == []
    assert "seed 2: failed earlier" in capsys.readouterr().err and failed.is_file()
    assert "| 1 (seed 2 failed: see failed.txt) |" in _row(
        (root / "comparison.md").read_text(), "RB-LoRA"
    )

    # --retry_failed runs it again; once it finishes the table shows it finished
    assert rblora([*argv[:1], "--retry_failed", *argv[1:]]) == 0 and ran == ["seed2"]
    assert not failed.exists()
    row = _row((root / "comparison.md").read_text(), "RB-LoRA")
    assert "| RB-LoRA | 2 |" in row and "failed" not in row

    # a failed.txt left beside a finished cell (finished by hand) is stale: cleared, not shown
    failed.write_text("old failure\n")
    ran.clear()
    assert rblora(argv) == 0 and ran == [] and not failed.exists()
    assert "failed" not in _row((root / "comparison.md").read_text(), "RB-LoRA")


def test_compare_writes_its_index_and_plots_atomically(workspace, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "FedIT", "--seeds", "1", "--rank_settings", "smallest"]
    argv += ["--output_dir", str(root), "--", *_base(workspace, tmp_path)]
    assert rblora(argv) == 0
    plots = {p.name: p.read_bytes() for p in (root / "plots").iterdir()}
    index = (root / "compare.json").read_bytes()

    def half_written(fig, fname, **kwargs):  # the disk fills up halfway through a plot
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG half")
        else:
            Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="No space left"):
        compare.write_comparison(root)
    assert {p.name: p.read_bytes() for p in (root / "plots").iterdir()} == plots  # no leftovers

    monkeypatch.undo()
    real_fsync = os.fsync

    def fsync(fd):  # ... and halfway through compare.json of a comparison with more seeds
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    assert rblora([*argv[:4], "1,2", *argv[5:]]) == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (root / "compare.json").read_bytes() == index
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    "name", ["ABS", "../escaped", "a/b", "a\\b", ".", "..", "", "a b", "wide:"]
)
def test_compare_refuses_setting_names_that_are_not_plain(workspace, tmp_path, capsys, name):
    # a setting name is a folder under --output_dir: nothing else may be built from it
    name = str(tmp_path / "abs") if name == "ABS" else name
    with pytest.raises(ValueError, match="rank setting name"):
        compare.rank_settings([f"{name}=2,2,2"], [2, 4, 8])
    argv = [
        "compare",
        "--methods",
        "RB-LoRA",
        "--seeds",
        "1",
        "--output_dir",
        str(tmp_path / "cmp"),
    ]
    argv += ["--rank_settings", f"{name}=2,2,2", "--", *_base(workspace, tmp_path)]
    assert rblora(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank setting name" in err[0] and "A-Za-z0-9_.-" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing is written"


def test_compare_refuses_a_setting_given_twice():
    with pytest.raises(ValueError, match="'wide' given twice"):
        compare.rank_settings(["wide=2,2,2", "wide=4,4,4"], [2, 4, 8])


def test_evaluate_scores_saved_adapters(flora_run, tmp_path, capsys):
    run = flora_run
    last = [r for r in metrics(run) if r["type"] == "round"][-1]
    out = tmp_path / "scores.json"
    argv = ["evaluate", "--adapter", str(run / "round_2" / "global"), "--out", str(out)]
    assert rblora(argv) == 0
    scores = json.loads(out.read_text())["eval"]
    # the global folder is the evaluated model: the same scores as the run's round 2
    assert abs(scores["loss"] - last["eval"]["loss"]) < 1e-4
    assert scores["suites"]["dev"]["accuracy"] == last["eval"]["suites"]["dev"]["accuracy"]
    assert "dev/accuracy" in capsys.readouterr().out
    client = [
        "evaluate",
        "--adapter",
        str(run / "round_1" / "client_2"),
        "--",
        "--eval_test_size",
        "2",
    ]
    assert rblora(client) == 0
    assert rblora(["evaluate", "--adapter", str(tmp_path / "nowhere")]) == 2
    (run / "results.json").unlink()
    assert rblora(["report", str(run)]) == 0 and (run / "results.json").is_file()


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, file",
    [
        (lambda f: _cut(f / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
        (lambda f: _cut(f / "adapter_config.json"), "adapter_config.json"),
        (
            lambda f: (f / "adapter_config.json").write_text('{"lora_alpha": 8}'),
            "adapter_config.json",
        ),
        (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json"),
        (lambda f: (f / "dense.safetensors").write_bytes(b"\x08\0\0"), "dense.safetensors"),
    ],
    ids=["cut-weights", "no-weights", "cut-config", "config-without-r", "no-config", "cut-dense"],
)
def test_evaluate_names_a_damaged_adapter_file(flora_run, tmp_path, capsys, damage, file):
    adapter = tmp_path / "global"
    shutil.copytree(flora_run / "round_2" / "global", adapter)
    damage(adapter)
    capsys.readouterr()
    assert rblora(["evaluate", "--adapter", str(adapter), "--run", str(flora_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(adapter / file) in err[0], err


def test_evaluate_names_an_empty_adapter_folder(flora_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rblora(["evaluate", "--adapter", str(tmp_path / "empty"), "--run", str(flora_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter_model.safetensors" in err[0] and "dense.safetensors" in err[0]


def test_evaluate_scales_each_module_as_peft_does(tmp_path):
    """A folder whose modules have their own ranks and alphas (rank_pattern / alpha_pattern):
    the delta evaluate applies is PEFT's, module by module (not one lora_alpha / r for all)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_models import build_tiny_llama

    from rblora.experiments.evaluate import adapter_delta

    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"^model\\.layers\\.1\\.self_attn\\.q_proj": 8},
        alpha_pattern={"v_proj": 3},
        init_lora_weights=False,
    )
    model = get_peft_model(build_tiny_llama(seed=2), config)
    model.save_pretrained(tmp_path / "adapter")
    delta, dense = adapter_delta(tmp_path / "adapter")
    assert dense == {} and len(delta) == 4
    for name, (a, b) in delta.items():
        want = model.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(b @ a, want)


def test_compare_names_a_rank_setting_that_is_not_integers(workspace, tmp_path, capsys):
    argv = ["compare", "--rank_settings", "wide=2,x,8", "--output_dir", str(tmp_path / "cmp")]
    assert rblora([*argv, "--", *_base(workspace, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rblora compare: error: rank setting 'wide=2,x,8': 'x' in '2,x,8' is")
    assert "invalid literal" not in err and not (tmp_path / "cmp").exists()


def test_evaluate_refuses_an_adapter_of_another_model(workspace, tmp_path, capsys):
    from tiny_models import build_tiny_llama

    from rblora.federation.cli import main as train

    assert train(lm_argv(workspace, tmp_path, num_communication_rounds=1)) == 0
    other = tmp_path / "other_model"  # q_proj (64, 32) instead of (32, 32)
    build_tiny_llama(vocab_size=104, head_dim=16).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (workspace / "model" / name).is_file():
            (other / name).write_bytes((workspace / "model" / name).read_bytes())
    capsys.readouterr()
    adapter = tmp_path / "3" / "round_1" / "global"
    argv = ["evaluate", "--adapter", str(adapter), "--", "--global_model", str(other)]
    assert rblora(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"rblora evaluate: error: adapter {adapter} does not fit: module ")
    assert "self_attn.q_proj is (32, 32) (d_out, d_in) in the adapter but (64, 32)" in err
    assert "merge_into_base" not in err


def test_compare_runs_a_method_with_its_own_client_protocol(workspace, tmp_path):
    """FFA-LoRA (A frozen, B alone sent), RoLoRA (B then A, one factor sent a round),
    FedEx-LoRA (a residual folded into the base) and HETLoRA (weights from the updates) are
    cells like any other; the first two's
    clients send fewer bytes than RB-LoRA's (one factor: d_out r or d_in r values a module
    instead of (d_in + d_out) r)."""
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "RB-LoRA,FFA-LoRA,RoLoRA,FedEx-LoRA,HETLoRA", "--seeds", "1"]
    argv += ["--rank_settings", "heterogeneous", "--output_dir", str(root), "--"]
    assert rblora([*argv, *_base(workspace, tmp_path)]) == 0
    index = json.loads((root / "compare.json").read_text())
    assert len(index["cells"]) == 5
    up, down = {}, {}
    for cell in index["cells"]:
        lines = metrics(root / cell["path"] / "3")
        method = {r["method"] for r in lines if r["type"] == "round" and r["round"] > 0}
        method = method.pop()
        up[method] = sum(r["bytes_up"] for r in lines if r["type"] == "client")
        down[method] = sum(r["bytes_down"] for r in lines if r["type"] == "client")
    assert 0 < up["FFA-LoRA"] < up["RB-LoRA"] and 0 < up["RoLoRA"] < up["RB-LoRA"]
    # FedEx-LoRA sends the factors up as RB-LoRA does, and its dense residual down besides
    assert up["FedEx-LoRA"] == up["RB-LoRA"] and down["FedEx-LoRA"] > down["RB-LoRA"]
    table = (root / "comparison.md").read_text()
    # HETLoRA (a round aggregated from its list) sends and receives both factors, as RB-LoRA
    assert up["HETLoRA"] == up["RB-LoRA"]
    for method in ("FFA-LoRA", "RoLoRA", "FedEx-LoRA", "HETLoRA"):
        assert f"| heterogeneous | {method} | 1 |" in table


def test_compare_runs_the_stack_methods_with_the_threshold_redistribution(workspace, tmp_path):
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "RB-LoRA,FlexLoRA", "--seeds", "1"]
    argv += ["--rank_settings", "heterogeneous", "--output_dir", str(root), "--"]
    argv += [*_base(workspace, tmp_path), "--reduction_method", "threshold", "--svd_energy", "0.9"]
    assert rblora(argv) == 0
    index = json.loads((root / "compare.json").read_text())
    assert len(index["cells"]) == 2
    for cell in index["cells"]:
        rounds = [r for r in metrics(root / cell["path"] / "3") if r["type"] == "round"]
        assert {r["reduction"] for r in rounds if r["round"] > 0} == {"threshold"}
    assert "| heterogeneous | FlexLoRA | 1 |" in (root / "comparison.md").read_text()


def test_compare_runs_fedsa_lora_beside_a_method_with_a_global_model(workspace, tmp_path):
    """FedSA-LoRA (B kept by the clients, A alone sent) is a cell like any other once the
    cells score each client's own model: its table row has the personalised figures and no
    global one, and its clients send A alone (fewer bytes than RB-LoRA's)."""
    from run_helpers import local_test_workspace

    base = _base(local_test_workspace(workspace, tmp_path / "ws"), tmp_path)
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "RB-LoRA,FedSA", "--seeds", "1"]
    argv += ["--rank_settings", "heterogeneous", "--output_dir", str(root), "--"]
    assert rblora([*argv, *base, "--eval_personalized"]) == 0
    index = json.loads((root / "compare.json").read_text())
    up = {}
    for cell in index["cells"]:
        lines = metrics(root / cell["path"] / "3")
        (method,) = {r["method"] for r in lines if r["type"] == "round" and r["round"] > 0}
        up[method] = sum(r["bytes_up"] for r in lines if r["type"] == "client")
    assert 0 < up["FedSA-LoRA"] < up["RB-LoRA"]
    table = (root / "comparison.md").read_text().splitlines()
    head = next(line for line in table if line.startswith("| setting |")).split(" | ")
    (row,) = [line.split(" | ") for line in table if "| heterogeneous | FedSA |" in line]
    assert row[head.index("personalized/loss_mean r2")] != "-"
    assert row[head.index("heldout/loss r2")] == "-"  # no global model, no global figure
