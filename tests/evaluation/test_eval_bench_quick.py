"""The evaluation benchmark's scorer/bare-forward ratio runs end to end on the real model (slow;
behaviour, not speed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_evaluation.py"


def test_ratio_part_prints_and_writes_the_ratio(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--part", "ratio", "--limit", "3", "--repeat", "1"]
    cmd += ["--dtypes", "fp32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\| fp32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \([\d., ]+\) \|$", proc.stdout, re.M)
    saved = json.loads(out.read_text())
    assert saved["items"] == 3 and saved["results"] == []
    [row] = saved["ratio"]
    assert row["dtype"] == "fp32" and row["ratio"] > 0 and len(row["ratio_per_pass"]) == 1
