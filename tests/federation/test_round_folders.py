"""``--save_every`` and ``--keep_last``: which round folders a run writes and keeps, through a
resume that changes them, a kill in the middle of a deletion, and ``rblora evaluate``/``report``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import lm_argv, metrics

import rblora
from rblora.cli import main as rblora_main
from rblora.federation import cli
from rblora.federation.rundir import RunFolder
from rblora.federation.saving import SavePlan, auto_every, round_folder_bytes
from rblora.protocol.types import UpdateLayout

SRC = Path(rblora.__file__).resolve().parents[1]
CLIENTS = ["client_0", "client_1", "client_2", "global"]
SEED_RANKS = [4, 4, 16, 16, 64, 64, 128, 128, 256, 256]


def _hidden(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


def _round_records(run: Path) -> list[int]:
    return [r["round"] for r in metrics(run) if r["type"] == "round"]


def test_save_every_and_keep_last_across_a_resume(workspace, tmp_path, capsys):
    argv = lm_argv(workspace, tmp_path, "--save_every", "2", "--keep_last", "2")
    assert cli.main([*argv, "--num_communication_rounds", "5"]) == 0
    run = tmp_path / "3"
    assert "round folders: every 2 rounds and the last" in capsys.readouterr().err
    # rounds 2, 4 and 5 (the last) were written; round 2's was deleted after round 5
    assert RunFolder(run).saved_rounds() == [4, 5]
    for t in (4, 5):
        assert sorted(p.name for p in (run / f"round_{t}").iterdir()) == CLIENTS
    assert _round_records(run) == [1, 2, 3, 4, 5] and not _hidden(run)

    # both options are resumable: 2 more rounds, every 3rd and the last written, all kept
    argv = lm_argv(workspace, tmp_path, "--save_every", "3", "--resume")
    assert cli.main([*argv, "--num_communication_rounds", "7"]) == 0
    assert RunFolder(run).saved_rounds() == [4, 5, 6, 7]
    assert _round_records(run) == list(range(1, 8))

    # the kept folders evaluate to the run's figures; the report is rebuilt from the metrics
    out = tmp_path / "scores.json"
    assert (
        rblora_main(["evaluate", "--adapter", str(run / "round_7/global"), "--out", str(out)]) == 0
    )
    last = [r for r in metrics(run) if r["type"] == "round"][-1]
    assert abs(json.loads(out.read_text())["eval"]["loss"] - last["eval"]["loss"]) < 1e-4
    (run / "results.json").unlink()
    assert rblora_main(["report", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["rounds_completed"] == 7


def test_a_small_model_saves_every_round_by_default(workspace, tmp_path, capsys):
    assert cli.main(lm_argv(workspace, tmp_path, "--keep_last", "1")) == 0
    assert "round folders: every round (each at most 25.09 kB), the newest 1 kept" in (
        capsys.readouterr().err
    )
    assert RunFolder(tmp_path / "3").saved_rounds() == [2]


@pytest.mark.parametrize("flag, value", [("--save_every", "-1"), ("--keep_last", "-2")])
def test_negative_counts_are_bad_input(workspace, tmp_path, capsys, flag, value):
    assert cli.main(lm_argv(workspace, tmp_path, flag, value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag[2:]} {value} must be >= 0" in err[0], err
    assert not tmp_path.joinpath("3").exists()


#: train.py, SIGKILLed while deleting a dropped round folder: one file of it is gone, the rest not.
KILLED_DROP = """
import json, os, shutil, signal, sys
from pathlib import Path
from rblora.federation import cli
real = shutil.rmtree
def rmtree(path, *args, **kwargs):
    if Path(path).name.startswith(".round_"):
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, *args, **kwargs)
shutil.rmtree = rmtree
sys.exit(cli.main(json.loads(sys.argv[1])))
"""


def test_a_kill_while_deleting_leaves_no_part_of_a_round_folder(workspace, tmp_path):
    argv = lm_argv(workspace, tmp_path, "--keep_last", "1", num_communication_rounds=3)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_DROP, json.dumps(argv)], env=env, check=False, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "3"
    # killed after round 2's checkpoint, deleting round 1's folder: it is no longer under its
    # name, only in a hidden temporary that nothing reads as a round
    assert RunFolder(run).saved_rounds() == [2] and _round_records(run) == [1, 2]
    (leftover,) = _hidden(run)
    assert leftover.startswith(".round_1.tmp-")
    argv = lm_argv(workspace, tmp_path, "--keep_last", "1", "--resume", num_communication_rounds=3)
    assert cli.main(argv) == 0
    assert RunFolder(run).saved_rounds() == [3] and _round_records(run) == [1, 2, 3]
    assert not _hidden(run)  # the leftover of the dead process is gone


def test_prune_and_leftovers_of_a_run_folder(tmp_path):
    folder = RunFolder(tmp_path)
    for t in (1, 2, 3, 4):
        (tmp_path / f"round_{t}" / "global").mkdir(parents=True)
        (tmp_path / f"round_{t}" / "global" / "adapter_model.safetensors").write_text("x")
    assert folder.prune_rounds(2, upto=3) == [1]  # round 4's is newer than the checkpoint
    assert folder.saved_rounds() == [2, 3, 4] and not _hidden(tmp_path)
    dead = tmp_path / ".round_9.tmp-999999999-0123456789ab"
    live = tmp_path / f".round_8.tmp-{os.getpid()}-0123456789ab"
    for path in (dead, live):
        (path / "round_x").mkdir(parents=True)
    folder.clean_dropped()
    assert _hidden(tmp_path) == [live.name]  # a live writer's temporary is left alone
    plan = SavePlan(every=3, keep_last=0, last_round=7)
    assert [t for t in range(1, 8) if plan.saves(t)] == [3, 6, 7]
    plan.begin_round(folder, 4)  # round 4 writes no folder: one of an interrupted attempt goes
    assert folder.saved_rounds() == [2, 3]


def _layout(shapes: dict[str, tuple[int, int]], layers: int) -> UpdateLayout:
    return UpdateLayout({f"layers.{i}.{m}": s for i in range(layers) for m, s in shapes.items()})


LLAMA_8B = _layout({"q_proj": (4096, 4096), "v_proj": (1024, 4096)}, 32)
SMOLLM2 = _layout({"q_proj": (576, 576), "v_proj": (192, 576)}, 30)


def test_the_automatic_schedule_for_the_papers_and_the_embedded_model():
    """Bounds of one round folder (global + ten clients, float32) and the resulting N over 50
    rounds: the figures of docs/paper-scale.md and of rblora.federation.saving's doc."""
    rb = round_folder_bytes(LLAMA_8B, SEED_RANKS, merge=False, clients=True)
    flora = round_folder_bytes(LLAMA_8B, SEED_RANKS, merge=True, clients=True)
    small = round_folder_bytes(SMOLLM2, SEED_RANKS, merge=True, clients=True)
    assert rb == 4 * 2 * 32 * 936 * (8192 + 5120)  # global stack and clients: rank 936 each
    assert flora == 4 * 32 * (4096 * 8192 + 1024 * 5120 + 936 * (8192 + 5120))
    assert (round(rb / 1e9, 2), round(flora / 1e9, 2), round(small / 1e9, 2)) == (3.19, 6.56, 0.31)
    assert auto_every(50, rb, 0) == 9  # rounds 9, 18, ..., 45, 50: 6 folders, 19 GB
    assert auto_every(50, flora, 0) == 17  # rounds 17, 34, 50
    assert auto_every(50, small, 0) == 1  # 15.6 GB
    assert auto_every(50, flora, 2) == 1  # at most 2 kept: 13 GB
    assert auto_every(3, flora, 0) == 1
    assert auto_every(5, 30 * 10**9, 0) == 5  # even one folder is above: the last only
    assert SavePlan(9, 0, 50).describe(rb) == (
        "round folders: every 9 rounds and the last (each at most 3.19 GB), all kept"
    )
