"""The `rblora` command table."""

import pytest

from rblora.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_names_the_valid_ones(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "'trian'" in err and "train" in err and "prepare-data" in err


def test_subcommand_dispatch(capsys):
    assert main(["train", "--method", "FedNope"]) == 2
    assert "FedNope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--local_learning_rate", "-1e-3"], "local_learning_rate -0.001 must be > 0"),
        (["train", "--local_learning_rate"], "--local_learning_rate: expected one argument"),
        (["train", "--bogus", "3"], "unrecognized arguments: --bogus 3"),
        (["prepare-data", "3", "--per_task"], "--per_task: expected one argument"),
        (["compare"], "required: --output_dir"),
        (["compare", "--seeds", "a,b", "--output_dir", "x"], "'a' in 'a,b' is not an integer"),
        (["compare", "--seeds", ",", "--output_dir", "x"], "give seeds >= 0"),
        (["evaluate"], "required: --adapter"),
        (["report"], "required: folders"),
        (["assets"], "required: command"),
        (["assets", "frob"], "invalid choice: 'frob'"),
        (["assets", "fetch", "nope"], "unknown asset 'nope'"),
        (["train", "--config", "configs/nope.yaml"], "shipped configs: embedded.yaml, flora.yaml"),
        (["configs", "nope.yaml"], "no shipped config 'nope.yaml'; shipped configs: embedded"),
        (["configs", "a", "b"], "give at most one config name, not 2"),
    ],
)
def test_usage_errors_are_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    """Not argparse's whole usage (34 lines for train.py) and no raw Python error: one line
    naming what was given and what is valid, exit code 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert " error: " in err and "Traceback" not in err and "usage:" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--timeout", "-1e3"], "--timeout '-1e3': give seconds > 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--", "--local_learning_rate", "-1e-3"], "local_learning_rate -0.001 must be > 0"),
    ],
)
def test_flower_local_usage_errors_are_one_line(argv, fragment, capsys):
    from rblora.flower.local import main as flower_local

    assert flower_local(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rblora.flower.local: error: ") and err.count("\n") == 1
    assert fragment in err


def test_configs_lists_and_prints_the_shipped_configs(capsys):
    from rblora import configs

    assert main(["configs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == configs.shipped()
    assert main(["configs", "embedded"]) == 0
    assert capsys.readouterr().out == configs.shipped_path("embedded.yaml").read_text()
