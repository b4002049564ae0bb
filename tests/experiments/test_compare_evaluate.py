"""rblora compare, evaluate and report on the tiny language model."""

from __future__ import annotations

import json

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


def test_evaluate_scores_saved_adapters(workspace, tmp_path, capsys):
    from rblora.federation.cli import main as train

    assert train(lm_argv(workspace, tmp_path, "--method", "FLoRA")) == 0
    run = tmp_path / "3"
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
