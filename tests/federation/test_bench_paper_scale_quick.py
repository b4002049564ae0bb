"""benchmarks/bench_paper_scale.py --quick: the rehearsal of the paper's configuration on tiny
Llama shapes runs end to end (a real train.py run, the server and one client in their own
processes) and prints its table with measured, extrapolated figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_paper_scale.py"


@pytest.mark.slow
def test_quick_rehearsal_prints_measured_figures(tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--methods", "RB-LoRA", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| aggregation seconds a round |" in done.stdout
    figures = json.loads(out.read_text())["RB-LoRA"]
    two = figures["2 layers"]
    assert two["peak RSS server (GB)"] > 0.1 and two["peak RSS one client, rank 16 (GB)"] > 0.1
    assert two["MB up a round (all clients)"] > 0 and two["MB down a round (all clients)"] > 0
    assert two["global folder MB (round 2)"] > figures["1 layer"]["global folder MB (round 2)"]


def test_extrapolation_separates_per_layer_from_fixed_quantities():
    sys.path.insert(0, str(BENCH.parent))
    import bench_paper_scale as bench

    one = {"peak RSS server (GB)": 3.0, "MB up a round (all clients)": 40.0,
           "aggregation seconds a round": 5.0}  # fmt: skip
    two = {"peak RSS server (GB)": 3.5, "MB up a round (all clients)": 80.0,
           "aggregation seconds a round": 4.0}  # fmt: skip
    got = bench.extrapolate(one, two, 32)
    assert got["peak RSS server (GB)"] == pytest.approx(2.5 + 32 * 0.5)  # fixed + per layer
    assert got["MB up a round (all clients)"] == pytest.approx(1280.0)  # proportional
    assert got["aggregation seconds a round"] == pytest.approx(64.0)  # from the 2-layer run
