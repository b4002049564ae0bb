"""The aggregation benchmark runs end to end on small shapes (behaviour, not speed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_aggregation.py"


def test_quick_benchmark_prints_table_and_accurate_projection():
    cmd = [sys.executable, str(BENCH), "--quick", "--methods", "RB-LoRA", "--repeat", "1"]
    cmd += ["--threads", "1"]  # no OpenMP spinning on a shared CI machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^method\s+reduction\s+aggregate\s+to clients", out, re.M)
    row = re.search(r"^RB-LoRA\s+svd(\s+[\d.e+-]+){8}\s*$", out, re.M)
    assert row, out
    assert re.search(r"^dense \(official\)\s+svd x10\s", out, re.M)
    assert re.search(r"RB-LoRA 32-layer round: [\d.]+ s wall-clock, [\d.]+ s CPU", out)
    assert re.search(r"speed-up over the dense approach: \d+x wall-clock, \d+x CPU", out)
    error = float(re.search(r"projection error: ([\d.e+-]+)", out).group(1))
    assert 0 < error < 1e-4
