"""The `rblora` command table."""

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
