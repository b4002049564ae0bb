"""A run keeps each evaluation's per-item outcomes in ``evaluation/round_<t>.json``."""

from __future__ import annotations

import json

import pytest
from run_helpers import lm_argv, metrics

from rblora.evaluation.items import load_mc_file
from rblora.evaluation.outcomes import mc_item_ids
from rblora.federation import cli
from rblora.federation.rundir import ResumeError, RunFolder


def _check_outcomes(run, rounds, dev_ids):
    """One file per evaluated round, agreeing with the round's figures; no outcomes in the
    metrics lines."""
    folder = RunFolder(run)
    assert sorted(p.name for p in (run / "evaluation").iterdir()) == [
        f"round_{t}.json" for t in rounds
    ]
    by_round = {r["round"]: r for r in metrics(run) if r["type"] == "round"}
    assert sorted(by_round) == rounds
    for t in rounds:
        suites = folder.read_items(t)
        figures = by_round[t]["eval"]["suites"]["dev"]
        assert "items" not in by_round[t]["eval"]
        assert suites["dev"]["ids"] == dev_ids
        for measure in ("accuracy", "acc_norm"):
            values = suites["dev"][measure]
            assert set(values) <= {0, 1} and len(values) == 6
            assert sum(values) / 6 == figures[measure]


def _dev_ids(workspace):
    from rblora.data.templates import Prompter

    return mc_item_ids(load_mc_file(workspace / "dev.json", Prompter("alpaca_short")))


def test_every_evaluation_writes_its_item_outcomes(workspace, tmp_path):
    argv = lm_argv(workspace, tmp_path, "--eval_base", "--save_every", "2", "--keep_last", "1")
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    _check_outcomes(run, [0, 1, 2], _dev_ids(workspace))
    assert not (run / "round_1").exists()  # pruned round folders keep their outcome files
    data = json.loads((run / "evaluation" / "round_2.json").read_text())
    assert data["round"] == 2 and set(data["suites"]) == {"dev"}


def test_a_round_killed_after_its_outcome_file_is_redone_once(workspace, tmp_path, monkeypatch):
    """Killed between round 2's outcome file and its metrics line: the resumed run redoes the
    round and replaces the file; nothing is lost or doubled."""
    real = RunFolder.append_metrics
    calls = {"n": 0}

    def dies_at_round_2(self, record):
        if record.get("type") == "round" and record["round"] == 2 and not calls["n"]:
            calls["n"] += 1
            assert self.items_path(2).is_file()  # written before the metrics line
            raise KeyboardInterrupt
        return real(self, record)

    monkeypatch.setattr(RunFolder, "append_metrics", dies_at_round_2)
    argv = lm_argv(workspace, tmp_path, "--eval_base")
    assert cli.main(argv) == 130
    run = tmp_path / "3"
    stale = (run / "evaluation" / "round_2.json").stat().st_mtime_ns
    assert [r["round"] for r in metrics(run) if r["type"] == "round"] == [0, 1]
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 0
    assert (run / "evaluation" / "round_2.json").stat().st_mtime_ns != stale
    _check_outcomes(run, [0, 1, 2], _dev_ids(workspace))


def test_outcome_files_of_the_run_folder(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_items(1) is None  # a run of an older version wrote none
    suites = {"test": {"ids": ["a", "b"], "accuracy": [1, 0]}}
    folder.write_items(1, suites)
    folder.write_items(1, suites)  # a redone round replaces its file
    assert folder.read_items(1) == suites
    assert sorted(p.name for p in (tmp_path / "evaluation").iterdir()) == ["round_1.json"]
    folder.items_path(2).write_text('{"round": 2, "suit')  # cut short
    with pytest.raises(ValueError, match="round_2.json is damaged"):
        folder.read_items(2)
    folder.items_path(3).write_text('{"round": 4, "suites": {}}')
    with pytest.raises(ValueError, match="does not hold round 3"):
        folder.read_items(3)
    # outcome files newer than the checkpoint's next round: the checkpoint is older than them
    folder.check_consistent(2)
    with pytest.raises(ResumeError, match=r"evaluation/round_3.json exists but the checkpoint"):
        folder.check_consistent(1)
