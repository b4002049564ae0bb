"""benchmarks/bench_methods.py image-sweep and image-privacy: the tables and plots of top-1
against the spread of the client ranks and against the privacy level, from comparisons' cells
(hand-made results here: seconds)."""

from __future__ import annotations

import json

from run_helpers import load_benchmark


def _bench():
    return load_benchmark("bench_methods")


def test_rank_sweep_tables_each_setting_by_its_spread(tmp_path):
    settings = {"skewed": [24] * 7 + [256] * 3, "equal": [94] * 10}
    top1 = {("RB-LoRA", "equal"): [0.5, 0.6], ("RB-LoRA", "skewed"): [0.4, 0.5],
            ("FlexLoRA", "equal"): [0.45, 0.55]}  # fmt: skip
    cells = []
    for (method, setting), values in top1.items():
        for seed, value in enumerate(values, start=1):
            path = f"{setting}/{method.lower()}/seed{seed}"
            cells.append({"setting": setting, "method": method, "seed": seed,
                          "ranks": settings[setting], "path": path})  # fmt: skip
            folder = tmp_path / path / "10"
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps({"final": {"test/accuracy": value}}))
    cells.append({"setting": "skewed", "method": "FlexLoRA", "seed": 1, "ranks": settings["skewed"],
                  "path": "skewed/flexlora/seed1"})  # unfinished: no results  # fmt: skip
    (tmp_path / "compare.json").write_text(json.dumps({"cells": cells, "num_clients": 10}))
    table = _bench().rank_sweep(tmp_path).splitlines()
    assert table[0] == "| method | equal (sum 940, sd 0) | skewed (sum 936, sd 106) |"
    assert table[2] == "| RB-LoRA | 0.550 ± 0.071 (0.500 / 0.600) | 0.450 ± 0.071 (0.400 / 0.500) |"
    assert table[3] == "| FlexLoRA | 0.500 ± 0.071 (0.450 / 0.550) | - |"
    assert (tmp_path / "plots" / "rank_sweep.png").stat().st_size > 1000


def test_privacy_utility_tables_each_level_and_names_stopped_seeds(tmp_path, monkeypatch):
    """One comparison per privacy level; a seed whose run stopped shows its last top-1 and the
    round it stopped in, outside the mean."""
    from rblora.experiments import compare

    rows = {  # (level, method, seed) -> top-1 per round reached
        ("inf", "RB-LoRA", 1): [0.3, 0.5], ("inf", "RB-LoRA", 2): [0.3, 0.6],
        ("8", "RB-LoRA", 1): [0.07], ("8", "RB-LoRA", 2): [0.1, 0.2],
        ("8", "FlexLoRA", 1): [0.08],  # not finished yet (no failed.txt): still running
    }  # fmt: skip
    for level in ("inf", "8"):
        cells = [{"method": m, "seed": s, "path": f"{m}/seed{s}"} for (lv, m, s) in rows
                 if lv == level]  # fmt: skip
        (tmp_path / f"epsilon_{level}").mkdir()
        index = {"cells": cells, "num_clients": 50, "rounds": 2}
        (tmp_path / f"epsilon_{level}" / "compare.json").write_text(json.dumps(index))
    (tmp_path / "epsilon_8" / "RB-LoRA" / "seed1").mkdir(parents=True)
    (tmp_path / "epsilon_8" / "RB-LoRA" / "seed1" / "failed.txt").write_text("diverged\n")

    def cell_rounds(root, cell, num_clients):
        level = root.name.removeprefix("epsilon_")
        top1 = rows[(level, cell["method"], cell["seed"])]
        spent = {"inf": [None, None], "8": [4.5, 7.99]}[level]  # what the runs recorded
        return [{"round": 0, "test/accuracy": 0.09}] + [
            {"round": t, "test/accuracy": v, "dp_epsilon": spent[t - 1]}
            for t, v in enumerate(top1, start=1)
        ]

    monkeypatch.setattr(compare, "cell_rounds", cell_rounds)
    table = _bench().privacy_utility(tmp_path, ["none", "inf", "8"]).splitlines()
    # named by the epsilon the finished runs recorded; none: not run
    assert table[0] == "| method | clip only (no noise) | epsilon 7.99 |"
    inf, eight = "0.550 ± 0.071 (0.500 / 0.600)", "0.200 ± 0.000 (0.070 (stopped in r2) / 0.200)"
    assert table[2] == f"| RB-LoRA | {inf} | {eight} |"
    # a cell still running is named so, not called stopped, and is in no mean
    assert table[3] == "| FlexLoRA | - | 0.080 (unfinished: r1 of 2) |"
    assert (tmp_path / "plots" / "privacy_utility.png").stat().st_size > 1000


def test_levels_outside_the_preset_are_refused_before_any_data_is_prepared(tmp_path, capsys):
    bench = _bench()
    for argv, said in (
        (["image-privacy", "--levels", "none,9"], "['9'] not among ['none', 'inf', '8', '2']"),
        (["image", "--levels", "none"], "the preset image has no privacy levels"),
    ):
        try:
            bench.main([*argv, "--output_dir", str(tmp_path)])
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
        assert said in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing prepared
