"""train.py with bad input, a diverging client and damaged or edited run folders.

Bad input is refused before anything is written (exit 2, one line, no traceback); a run that
cannot go on stops with one line naming who and when (exit 1) and writes no broken file.
"""

from __future__ import annotations

import json
import shutil

import pytest
from run_helpers import assert_refused_in_one_line, lm_argv, metrics

from rblora.federation import cli


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "FedNope"], "FedNope"),
        (["--client_ranks", "2,4,64"], "rank 64 is above"),
        (["--num_clients", "4", "--client_ranks", "2,2,2,2"], "no prepared data for 4"),
        (["--global_model", "nobody/no-such-model-xyz"], "no-such-model-xyz"),
        (["--global_model", "/"], "no config.json"),
        (["--lora_target_modules", "nope_proj"], "'nope_proj' matches no module"),
        (["--dev_data_path", "/nonexistent/dev.json"], "dev.json"),
        (
            ["--client_dataset_size_dict", '{"client_0": 1, "client_1": 2, "client_2": 3}'],
            "does not match",
        ),
        (["--method", "RB-LoRA", "--reduction_method", "truncate"], "does not support"),
        (
            ["--reduction_method", "threshold", "--svd_energy", "1.5"],
            "svd_energy 1.5 must be a fraction in (0, 1]",
        ),
        (["--svd_energy", "0"], "svd_energy 0.0 must be a fraction in (0, 1]"),
        (
            ["--method", "FedIT", "--client_ranks", "2,2,2", "--reduction_method", "threshold"],
            "(threshold, FLoRIST's, cuts the SVD of the stacked client updates;",
        ),
        (
            ["--method", "FFA-LoRA", "--reduction_method", "svd"],
            "(its A stays frozen at the shared initialisation; svd or merge would replace it)",
        ),
        (
            ["--method", "RoLoRA", "--reduction_method", "merge"],
            "(its rounds hold one factor at the last global one; svd or merge would replace it)",
        ),
        (
            ["--method", "FedEx-LoRA", "--reduction_method", "svd"],
            "(its residual is computed against the averaged factors clients start from;",
        ),
        (
            ["--method", "HETLoRA", "--dp_clip", "1", "--dp_noise_multiplier", "1"],
            "HETLoRA cannot be made differentially private: its sparsity weights",
        ),
        (["--method", "HETLoRA", "--hetlora_lambda", "-1"], "hetlora_lambda -1.0 must be a finite"),
        (
            ["--method", "HETLoRA", "--hetlora_prune_gamma", "1.5"],
            "hetlora_prune_gamma 1.5 must be a fraction in (0, 1)",
        ),
        (
            ["--method", "RB-LoRA", "--hetlora_lambda", "0.1"],
            "--hetlora_lambda 0.1: RB-LoRA's clients do not prune their rank",
        ),
        (["--method", "FLoRA", "--reduction_method", "zip"], "zip"),
        (["--client_lora_rank_dict", '{"client_0": 2, "client_1": 4, "client_2": 2.7}'], "2.7"),
        (["--cutoff_len", "1"], "cutoff_len=1"),
        (["--local_learning_rate", "3e38"], "overflows float32"),
        (["--local_learning_rate", "-1e-3"], "local_learning_rate -0.001 must be > 0"),
        (["--lora_alpha", "-inf"], "lora_alpha -inf must be > 0"),
        (["--client_ranks", "-4,8,8"], "client 0: rank -4 is invalid"),
        (["--seed", "-1"], "seed -1 must be >= 0"),
        (["--bogus", "3"], "unrecognized arguments: --bogus 3 (see train.py --help)"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--image_size", "112"], "--image_size: option(s) of the image task"),
        (["--resume"], "holds no run"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(workspace, tmp_path, extra, fragment, capsys):
    assert_refused_in_one_line(workspace, tmp_path / "out", extra, fragment, capsys)


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        (
            "client_lora_rank_dict: {client_0: 2, client_1: true, client_2: 8}\n",
            "client_1=True, which is a boolean",
        ),
        ("client_ranks: [2, 4.5, 8]\n", "4.5"),
        ("num_communication_rounds: true\n", "num_communication_rounds=True"),
        ("local_num_epochs: 1.5\n", "local_num_epochs=1.5"),
    ],
)
def test_yaml_counts_must_be_integers(workspace, tmp_path, yaml_text, fragment, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    argv = lm_argv(workspace, tmp_path / "out", "--config", str(cfg))
    # the YAML file must win for the keys it sets: drop the helper's flags for them
    for key in ("client_ranks", "num_communication_rounds", "local_num_epochs"):
        if key in yaml_text:
            i = argv.index(f"--{key}")
            del argv[i : i + 2]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_client_file(workspace, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    (data / "3" / "local_training_1.json").write_text('[{"instruction": "x",')
    assert cli.main(lm_argv(workspace, tmp_path / "out", data_path=data)) == 2
    assert "local_training_1.json" in capsys.readouterr().err


@pytest.mark.parametrize("lr", ["1e9", "1e37"])
def test_diverging_client_stops_the_run(workspace, tmp_path, lr, capsys):
    assert cli.main(lm_argv(workspace, tmp_path, local_learning_rate=lr)) == 1
    err = capsys.readouterr().err
    assert "client 0 (rank 2) in round 1: training diverged at step 1" in err
    assert "Traceback" not in err
    run = tmp_path / "3"
    assert not (run / "round_1").exists()  # no adapter of a diverged client was written
    assert not (run / "checkpoint").exists()


def test_an_error_after_the_folder_was_written_is_not_reported_as_bad_input(
    workspace, tmp_path, monkeypatch, capsys
):
    """A ValueError raised in round 2 (here injected) used to print "error:" with exit code 2,
    the answer for bad input with nothing written, though round 1 was on disk."""
    from rblora.tasks.lm import CausalLMTask

    original = CausalLMTask.train_client

    def fails_in_round_2(self, spec, start, *, seed, round_):
        if round_ == 2:
            raise ValueError("injected")
        return original(self, spec, start, seed=seed, round_=round_)

    monkeypatch.setattr(CausalLMTask, "train_client", fails_in_round_2)
    assert cli.main(lm_argv(workspace, tmp_path)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert lines == [
        f"train.py: stopped: ValueError: injected (raised after the run folder {tmp_path / '3'} "
        "was written; it keeps its 1 completed round(s): continue with --resume once the cause "
        "is fixed)"
    ]
    assert (tmp_path / "3" / "round_1" / "global").is_dir()
    monkeypatch.setattr(CausalLMTask, "train_client", original)
    assert cli.main(lm_argv(workspace, tmp_path, "--resume")) == 0
    assert [r["round"] for r in metrics(tmp_path / "3") if r["type"] == "round"] == [1, 2]


def test_a_finite_explosion_stops_the_run(workspace, tmp_path, capsys):
    # LoRA on the output head at lr 10: the loss leaps from 4.6 to ~100 at step 2 while every
    # weight stays finite and below max_abs_weight; the run used to finish with it
    extra = ["--lora_target_modules", "q_proj", "v_proj", "lm_head"]
    assert cli.main(lm_argv(workspace, tmp_path, *extra, local_learning_rate=10)) == 1
    err = capsys.readouterr().err
    stops = [line for line in err.splitlines() if line.startswith("train.py: stopped:")]
    assert len(stops) == 1 and "Traceback" not in err
    assert "client 0 (rank 2) in round 1: training diverged at step 2: the loss rose from" in err
    assert not (tmp_path / "3" / "round_1").exists()


# ---------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def finished_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert cli.main(lm_argv(workspace, out, "--method", "FLoRA")) == 0
    return out


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _resume(workspace, out, *extra):
    return cli.main(lm_argv(workspace, out, "--method", "FLoRA", "--resume", *extra))


def test_resume_of_a_finished_run_with_more_rounds(workspace, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    assert _resume(workspace, out, "--num_communication_rounds", "3") == 0
    assert [r["round"] for r in metrics(out / "3") if r["type"] == "round"] == [1, 2, 3]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--lora_dropout", "0.1"], "lora_dropout: run has 0.05, now 0.1"),
        (["--bf16", "auto"], "bf16: run has 'false', now 'auto'"),
        (["--local_learning_rate", "0.02"], "local_learning_rate"),
        (["--client_ranks", "2,4,4"], "client_ranks"),
    ],
)
def test_resume_refuses_other_options(workspace, finished_run, tmp_path, extra, fragment, capsys):
    out = _copy(finished_run, tmp_path)
    assert _resume(workspace, out, *extra) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("truncate checkpoint/server.safetensors", "server.safetensors does not match its sha256"),
        ("delete checkpoint/server.safetensors", "server.safetensors is missing"),
        ("truncate checkpoint/state.json", "state.json does not match its sha256"),
        ("edit checkpoint/state.json", "state.json does not match its sha256"),
        ("delete checkpoint/manifest.json", "manifest.json is missing or damaged"),
        ("delete checkpoint", "round_2 exists but the checkpoint is from round 0"),
        ("truncate config.json", "config.json is damaged"),
    ],
)
def test_resume_refuses_a_damaged_checkpoint(
    workspace, finished_run, tmp_path, damage, fragment, capsys
):
    out = _copy(finished_run, tmp_path)
    run = out / "3"
    what, name = damage.split(" ", 1)
    path = run / name
    if what == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif what == "edit":
        state = json.loads(path.read_text())
        state["completed_rounds"] = 1
        path.write_text(json.dumps(state))
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert _resume(workspace, out, "--num_communication_rounds", "3") == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_resume_refuses_data_prepared_again(workspace, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    argv = lm_argv(workspace, tmp_path / "out", data_path=data, num_communication_rounds=1)
    assert cli.main(argv) == 0
    test_file = data / "3" / "global_test.json"
    test_file.write_text(json.dumps(json.loads(test_file.read_text())[::-1]))
    assert cli.main([*argv, "--resume", "--num_communication_rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert "data folder changed" in err and "global_test.json" in err


def test_long_prompts_give_way_and_their_responses_train(workspace, tmp_path, capsys):
    # client 1's prompts are longer than cutoff_len: cut from the right (the seed's way) none of
    # its records kept a token to train on; cut from the left, each keeps its response
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    path = data / "3" / "local_training_1.json"
    records = json.loads(path.read_text())
    path.write_text(json.dumps([{**r, "instruction": "Say " + "x" * 200} for r in records]))
    out = tmp_path / "out"
    argv = lm_argv(workspace, out, "--train_on_inputs", "false", "--num_communication_rounds", "1",
                   data_path=data)  # fmt: skip
    assert cli.main(argv) == 0
    (client_1,) = [r for r in metrics(out / "3") if r.get("client") == 1]
    assert client_1["num_examples"] == len(records) and client_1["loss"] > 0
    assert client_1["tokens"] == 160 * len(records)  # every record filled to cutoff_len
