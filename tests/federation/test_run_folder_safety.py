"""A run folder under ``--overwrite``, kills and a second run on the same folder.

``--overwrite`` moves the old run to ``.<K>.replaced`` and deletes it only when the new run
completes; a kill at any moment leaves a finished run somewhere, and ``--resume`` or another
``--overwrite`` go on from there. One run at a time holds ``.<K>.run.lock``; a second run on the
folder is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import lm_argv, metrics

import rblora
from rblora.federation import cli
from rblora.federation.rundir import RunFolder, drop_replaced, lock_path, locked

SRC = Path(rblora.__file__).resolve().parents[1]


def _run_with_config(path: Path, text: str) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(text)
    (path / "round_1").mkdir()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_overwrite_keeps_the_old_run_aside_until_the_new_one_completes(tmp_path):
    run = tmp_path / "3"
    _run_with_config(run, "old")
    with locked(run) as folder:
        folder.start({"new": 1}, log=lambda _: None)
    assert _names(tmp_path) == [".3.replaced", "3"]
    assert (tmp_path / ".3.replaced" / "config.json").read_text() == "old"
    assert _names(run) == ["config.json"]
    # a second --overwrite before the first completed: the unfinished run goes, the old stays
    with locked(run) as folder:
        folder.start({"newer": 1}, log=lambda _: None)
    assert _names(tmp_path) == [".3.replaced", "3"]
    assert (tmp_path / ".3.replaced" / "config.json").read_text() == "old"
    assert json.loads((run / "config.json").read_text()) == {"newer": 1}
    drop_replaced(run)  # the new run completed
    assert _names(tmp_path) == ["3"]


#: RunFolder.start replacing a run, SIGKILLed at its 3rd os.replace (the 1st writes config.json):
#: the old run has been moved aside, the new folder is not in place yet.
KILLED_START = """
import os, signal, sys
from pathlib import Path
from rblora.federation.rundir import RunFolder
real, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
RunFolder(Path(sys.argv[1])).start({"new": 1}, log=print)
"""


def test_a_kill_between_the_renames_puts_the_old_run_back(tmp_path):
    run = tmp_path / "3"
    _run_with_config(run, "old")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", KILLED_START, str(run)], env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not run.exists() and (tmp_path / ".3.replaced").is_dir()
    with locked(run):  # every run settles the folder first
        pass
    assert _names(tmp_path) == ["3"]  # temporaries gone, lock released and removed
    assert (run / "config.json").read_text() == "old" and (run / "round_1").is_dir()


def test_settle_puts_the_old_run_back_into_an_empty_folder(tmp_path):
    _run_with_config(tmp_path / ".3.replaced", "old")
    (tmp_path / "3").mkdir()
    with locked(tmp_path / "3") as folder:
        assert folder.config_path.read_text() == "old"
    assert _names(tmp_path) == ["3"]


# ---------------------------------------------------------------------- end to end
TRAIN = """
import json, sys
from rblora.federation import cli
sys.exit(cli.main(json.loads(sys.argv[1])))
"""


def _wait_for_round(run: Path, proc: subprocess.Popen, round_: int, seed: int) -> None:
    """Until the run of ``seed`` in ``run`` has written the metrics line of ``round_``."""
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        started = False
        with contextlib.suppress(OSError, ValueError):
            started = json.loads((run / "config.json").read_text())["seed"] == seed
        if started and any(
            r.get("type") == "round" and r.get("round") == round_
            for r in RunFolder(run).read_metrics()
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"round {round_} did not finish in time")


def test_overwrite_killed_mid_run_then_resume_or_overwrite_again(
    workspace, tmp_path, monkeypatch, capsys
):
    out, run = tmp_path / "out", tmp_path / "out" / "3"
    kept = out / ".3.replaced"
    assert cli.main(lm_argv(workspace, out, num_communication_rounds=1)) == 0  # the old run
    old_results = (run / "results.json").read_text()
    capsys.readouterr()

    # a new run over it, SIGKILLed right after round 1's metrics line
    argv = lm_argv(workspace, out, "--overwrite", seed=4, num_communication_rounds=6)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, json.dumps(argv)], env=env)
    try:
        _wait_for_round(run, proc, 1, seed=4)
        # meanwhile: a second run on the folder is refused at once, naming the first
        for extra in (["--overwrite"], ["--resume"]):
            again = lm_argv(workspace, out, *extra, seed=4, num_communication_rounds=6)
            assert cli.main(again) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(
                f"train.py: error: output folder {run} is in use by another run (pid {proc.pid} "
            )
        assert (kept / "results.json").read_text() == old_results  # the old run, aside
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (kept / "results.json").read_text() == old_results
    assert (run / "round_1").is_dir() and not (run / "results.json").exists()
    assert json.loads((run / "config.json").read_text())["seed"] == 4
    assert lock_path(run).is_file()  # left by the kill, released by the OS
    shutil.copytree(out, tmp_path / "copy", symlinks=True)

    # --resume continues the killed run; when it completes, the old run is deleted
    resume = lm_argv(workspace, out, "--resume", seed=4, num_communication_rounds=2)
    assert cli.main(resume) == 0
    assert [r["round"] for r in metrics(run) if r["type"] == "round"] == [1, 2]
    assert _names(out) == ["3"]

    # or: --overwrite again, itself stopped in round 1; the old run is still the one kept
    out, run, kept = tmp_path / "copy", tmp_path / "copy" / "3", tmp_path / "copy" / ".3.replaced"
    from rblora.tasks.lm import CausalLMTask

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CausalLMTask, "train_client", interrupted)
    again = lm_argv(workspace, out, "--overwrite", seed=5, num_communication_rounds=1)
    assert cli.main(again) == 130
    assert "the run it replaced stays in" in capsys.readouterr().err
    assert (kept / "results.json").read_text() == old_results
    assert json.loads((run / "config.json").read_text())["seed"] == 5
    assert _names(out) == [".3.replaced", "3"]  # the lock is released and removed


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_refused_second_run_writes_nothing(workspace, tmp_path, flag, capsys):
    out = tmp_path / "out"
    with locked(out / "3"):
        assert cli.main(lm_argv(workspace, out, flag)) == 2
        assert f"(pid {os.getpid()} on " in capsys.readouterr().err
        assert _names(out) == [".3.run.lock"]
    assert not out.exists()
