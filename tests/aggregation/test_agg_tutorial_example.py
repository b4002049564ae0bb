"""The tutorial's method (examples/component_mean.py): its formula on a hand-computed example, the
invariants every method keeps, and the file run as the tutorial runs it, ``rblora compare``
against RB-LoRA on the tiny language model (in its own process, so that registering the method
does not change this process's registry)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from agg_helpers import client_delta, make_clients
from run_helpers import lm_argv, lm_workspace

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "component_mean.py"
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("component_mean", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the method; registers it only in main()
    return module


def _global_delta(method, clients):
    pairs = [u.scaled_factors(MODULE, torch.float64) for u in clients]
    a, b = method.combine(
        [p[0] for p in pairs], [p[1] for p in pairs], [u.num_examples for u in clients]
    )
    return b @ a


def test_importing_the_example_registers_nothing(example):
    from rblora.aggregation import available_methods

    assert "Component Mean" not in available_methods()


def test_weights_by_hand(example):
    # ranks 1 and 3: component 0 is held by both (1/2 each), components 1 and 2 by client 1 alone
    gamma = example.component_mean_weights([1, 3], [500, 2500])
    assert gamma.dtype == torch.float64
    assert gamma.tolist() == [[0.5, 0.0, 0.0], [0.5, 1.0, 1.0]]


def test_with_equal_client_sizes_it_is_rb_lora(example):
    from rblora.aggregation.rb_lora import rank_balanced_weights

    ranks = [4, 4, 16, 64]
    same = example.component_mean_weights(ranks, [30] * 4)
    torch.testing.assert_close(same, rank_balanced_weights(ranks, [30] * 4))
    assert not torch.equal(same, rank_balanced_weights(ranks, [40, 16, 8, 8]))


def test_two_clients_by_hand(example):
    c0, c1 = make_clients([1, 3], [500, 2500], seed=4)
    a0, b0 = c0.scaled_factors(MODULE, torch.float64)
    a1, b1 = c1.scaled_factors(MODULE, torch.float64)
    expected = 0.5 * b0[:, :1] @ a0[:1] + 0.5 * b1[:, :1] @ a1[:1] + b1[:, 1:] @ a1[1:]
    torch.testing.assert_close(_global_delta(example.METHOD, [c0, c1]), expected)


def test_invariants(example):
    # one client: its own update; client order does not matter; equal ranks: the mean update
    (solo,) = make_clients([3], [7], seed=1)
    torch.testing.assert_close(_global_delta(example.METHOD, [solo]), client_delta(solo, MODULE))
    clients = make_clients([2, 4, 8], [10, 20, 30], seed=2)
    torch.testing.assert_close(
        _global_delta(example.METHOD, clients), _global_delta(example.METHOD, clients[::-1])
    )
    same = make_clients([4, 4, 4], [10, 20, 30], seed=3)
    mean = sum(client_delta(u, MODULE) for u in same) / 3
    torch.testing.assert_close(_global_delta(example.METHOD, same), mean)


def test_the_tutorial_runs_it_against_rb_lora(tmp_path):
    ws = lm_workspace(tmp_path / "ws")
    train = lm_argv(ws, tmp_path / "unused", num_communication_rounds=1)
    i = train.index("--output_dir")
    del train[i : i + 2]  # compare sets each cell's folder
    root = tmp_path / "tutorial"
    argv = [sys.executable, str(EXAMPLE), "--methods", "RB-LoRA,Component Mean", "--seeds", "1",
            "--output_dir", str(root), "--", *train]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT / "src")  # this checkout's rblora, as in the tests' process
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = (root / "comparison.md").read_text()
    assert "| heterogeneous | RB-LoRA | 1 |" in table
    assert "| heterogeneous | Component Mean | 1 |" in table
    assert "Component Mean" in done.stdout and "RB-LoRA" in done.stdout
    assert (root / "heterogeneous" / "component-mean" / "seed1" / "3" / "results.json").is_file()
