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
