"""The server-scale benchmark runs on tiny shapes and prints a row per case."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_server_scale.py"


def test_quick_server_scale_benchmark_prints_memory_and_time_per_case():
    cmd = [sys.executable, str(BENCH), "--quick", "--methods", "RB-LoRA"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(
        r"^\| quick \| RB-LoRA \| (off|on) \| (\d+) \| (\d+) \| ([\d.]+) \| (\d+) \|",
        proc.stdout,
        re.M,
    )
    assert [(dp, int(k)) for dp, k, *_ in rows] == [("off", 10), ("off", 100), ("on", 10),
                                                    ("on", 100)]  # fmt: skip
    # the server's memory (from its first reply) is a part of the process's peak
    assert all(0 < int(mb) < int(peak) and float(x) > 0 for _, _, mb, x, peak in rows)
