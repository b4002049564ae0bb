"""benchmarks/bench_methods.py image-sweep: the table and plot of top-1 against the spread of
the client ranks, from a comparison's cells (hand-made results here: seconds)."""

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
