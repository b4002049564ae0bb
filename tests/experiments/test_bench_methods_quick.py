"""benchmarks/bench_methods.py --quick on the real embedded models (slow): the comparison table
of the Results page (docs/results.md), in a form that runs in minutes."""

from __future__ import annotations

import json
import re

import pytest
from run_helpers import load_benchmark

pytestmark = pytest.mark.slow


def _bench():
    return load_benchmark("bench_methods")


def _rows(table: str) -> list[list[str]]:
    """The cells of each row of the markdown tables in ``table`` (setting, method, ...)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    return [cells for cells in rows if len(cells) > 2]


def _row(table: str, method: str) -> list[str]:
    for cells in _rows(table):
        if cells[1] == method:
            return cells
    raise AssertionError(f"no row for {method} in\n{table}")


def _number(cell: str) -> float:
    match = re.fullmatch(r"(-?[\d.]+)( ± [\d.]+)?", cell)
    assert match, cell
    return float(match.group(1))


@pytest.mark.parametrize(
    ("task", "methods", "metric"),
    [
        ("lm", ["RB-LoRA", "FLoRA"], "test/accuracy r1"),
        ("image", ["RB-LoRA", "FLoRA", "head-only"], "test/accuracy r1"),
    ],
)
def test_quick_comparison_writes_table_and_plots(tmp_path, task, methods, metric):
    out = tmp_path / task
    assert _bench().main([task, "--quick", "--output_dir", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| setting |"))
    head = [c.strip() for c in header.strip("|").split("|")]
    column = head.index(metric)
    base = _row(table, "base model")
    assert 0.0 <= _number(base[column]) <= 1.0
    for method in methods:
        row = _row(table, method)
        assert row[2] == "1"  # one seed
        accuracy = _number(row[column])
        assert 0.0 <= accuracy <= 1.0
        if method != "head-only":
            assert float(row[head.index("MB up/round")]) > 0
    assert (out / "plots" / "test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # a second call keeps every finished cell (nothing re-run) and rewrites the same table
    assert _bench().main([task, "--quick", "--output_dir", str(out)]) == 0
    assert (out / "comparison.md").read_text() == table
    # --methods takes a part of the comparison (how processes split it): its cell is kept,
    # and the table still has every part
    part = f"{methods[-1]}@heterogeneous"
    assert _bench().main([task, "--quick", "--output_dir", str(out), "--methods", part]) == 0
    assert (out / "comparison.md").read_text() == table


def test_quick_personal_preset_scores_every_method_on_its_clients_own_splits(tmp_path):
    """image-personal: FedSA-LoRA (no global model) beside RB-LoRA, both with a personalised
    accuracy after round 1; FedSA-LoRA has no global figure."""
    out = tmp_path / "personal"
    assert _bench().main(["image-personal", "--quick", "--output_dir", str(out)]) == 0
    assert json.loads((out / "data" / "3" / "partition.json").read_text())["local_test_frac"]
    table = (out / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| setting |"))
    head = [c.strip() for c in header.strip("|").split("|")]
    personal = head.index("personalized/accuracy_mean r1")
    for method in ("RB-LoRA", "FedSA-LoRA"):
        assert 0.0 <= _number(_row(table, method)[personal]) <= 1.0
    assert _row(table, "FedSA-LoRA")[head.index("test/accuracy r1")] == "-"


def test_quick_privacy_utility_runs_one_comparison_per_level(tmp_path, capsys):
    out = tmp_path / "privacy"
    assert _bench().main(["image-privacy", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    # levels named by the epsilon their runs recorded (one round at q = 1, solved for 8)
    head = re.search(
        r"\| method \| no DP \| clip only \(no noise\) \| (epsilon [\d.]+) \|", printed
    )
    assert head and 7.9 < float(head.group(1).split()[1]) <= 8
    row = next(line for line in printed.splitlines() if line.startswith("| RB-LoRA |"))
    assert "stopped" not in row  # one round at q = 1: every level finishes
    # each level paired with the same seed's run without DP, on the same test images
    for level in ("clip only (no noise)", head.group(1)):
        assert re.search(rf"\| RB-LoRA \| {re.escape(level)} \| [+-]\d\.\d{{3}} \| \[", printed)
    for level, spent in (("inf", "inf"), ("8", None)):
        table = (out / f"epsilon_{level}" / "comparison.md").read_text()
        header = next(line for line in table.splitlines() if line.startswith("| setting |"))
        head = [c.strip() for c in header.strip("|").split("|")]
        eps = _row(table, "RB-LoRA")[head.index("DP epsilon r1")]
        assert eps == spent if spent else 0 < float(eps) <= 8
    assert (out / "plots" / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_large_privacy_preset_samples_hundreds_and_clips_adaptively(tmp_path, capsys):
    """The cross-device preset in small: 300 clients, Poisson q = 0.1, the clip adaptive."""
    out = tmp_path / "large"
    assert _bench().main(["image-privacy-large", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    head = re.search(r"\| method \| no DP \| (epsilon [\d.]+) \|", printed)
    assert head and 0 < float(head.group(1).split()[1]) <= 8
    config = next((out / "epsilon_8").rglob("config.json"))
    privacy = json.loads(config.read_text())["privacy"]
    assert privacy["sampling"] == "poisson" and privacy["sample_rate"] == 0.1
    assert privacy["delta"] == 1e-6 and privacy["adaptive_clip"]["quantile"] == 0.5
