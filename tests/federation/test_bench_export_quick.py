"""The export-size benchmark runs end to end on small shapes: each module at its own rank."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_export.py"


def test_quick_export_benchmark_prints_the_size_table():
    cmd = [sys.executable, str(BENCH), "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.findall(r"^\| (\S+ round \d) \| (\d+, \d+) \|", proc.stdout, re.M))
    # q 512x512, v 128x512, 124 components a round: v dense from round 1, q from round 3
    assert rows == {
        "RB-LoRA round 1": "124, 124",
        "FLoRA round 1": "124, 128",
        "FLoRA round 2": "248, 128",
        "FLoRA round 3": "512, 128",
    }
    errors = re.findall(r"\| ([\d.e+-]+) \|$", proc.stdout, re.M)
    assert len(errors) == 4 and all(float(e) < 1e-5 for e in errors)  # float32 rounding
