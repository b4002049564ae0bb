"""The seed's command line on the real embedded data (fetches the assets on first use)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rblora.data import load_federated_images, load_federated_split
from rblora.data.partition import SEED_CLIENT_SIZES
from rblora.data.prepare import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_seed_command_on_the_embedded_mixture(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "prepare_data.py"), "10", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    data = load_federated_split(tmp_path / "data", 10)
    meta = data.meta
    assert meta["source"] == "mixture" and "mmlu" not in meta["categories"]
    assert len(meta["categories"]) == len(meta["sources"]) >= 10
    assert data.client_sizes == list(SEED_CLIENT_SIZES)  # the pool (16,102) holds 14,800
    assert Counter(r["task"] for r in data.global_test) == dict.fromkeys(meta["categories"], 20)
    key = lambda r: (r["task"], r["context"], r["response"])  # noqa: E731
    train = {key(r) for c in data.clients for r in c}
    assert not train & {key(r) for r in data.global_test}
    for r in data.global_test:
        letter = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[r["answer"]]
        assert r["response"] == f"The answer is: {letter}. {r['choices'][r['answer']]}"
        assert r["context"].startswith("Question: ") and " Options: A. " in r["context"]
    assert (tmp_path / "data" / "10" / "partition.png").stat().st_size > 10_000


def test_digits_dirichlet_round_trip(tmp_path):
    out = tmp_path / "out"
    assert main(["5", "0", "--source", "digits", "--min_size", "20", "--output_dir", str(out)]) == 0
    data = load_federated_images(out, 5)
    assert sum(c.labels.numel() for c in data.clients) == 1437  # the whole train split
    assert data.global_test.labels.numel() == 360  # 36 per class < 100: all of it
    assert tuple(data.clients[0].images.shape[1:]) == (8, 8)
    meta = json.loads((out / "5" / "partition.json").read_text())
    assert meta["client_sizes"] == [c.labels.numel() for c in data.clients]
