"""A second run on a run folder in use: one run at a time holds ``.<K>.run.lock``; a second
run on the folder is refused, naming the first, and writes nothing.
"""

from __future__ import annotations

import os

import pytest
from run_helpers import lm_argv

from rblora.federation import cli
from rblora.federation.rundir import locked


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_refused_second_run_writes_nothing(workspace, tmp_path, flag, capsys):
    out = tmp_path / "out"
    with locked(out / "3"):
        assert cli.main(lm_argv(workspace, out, flag)) == 2
        assert f"(pid {os.getpid()} on " in capsys.readouterr().err
        assert _names(out) == [".3.run.lock"]
    assert not out.exists()
