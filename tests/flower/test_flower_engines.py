"""The Flower engines with real runtimes: Flower's simulation (Ray workers) and a local
deployment (a SuperLink and three SuperNodes as processes on 127.0.0.1, free ports).

Every process a test starts is stopped by its process group, also when the test fails.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from run_helpers import adapter_tensors, lm_argv, metrics
from tiny_models import build_tiny_vit

from rblora.federation import cli
from rblora.federation.options import parse_args
from rblora.flower.local import LocalDeployment, node_configs


@pytest.fixture(scope="module")
def inprocess(workspace, tmp_path_factory):
    """The in-process engine's run of the same options (the reference)."""
    out = tmp_path_factory.mktemp("inprocess")
    assert cli.main(lm_argv(workspace, out)) == 0
    return out / "3"


def _same_adapters(run_a, run_b, rounds=(1, 2)):
    for t in rounds:
        a = adapter_tensors(run_a / f"round_{t}" / "global")
        b = adapter_tensors(run_b / f"round_{t}" / "global")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_simulation_engine_language_model(workspace, tmp_path, inprocess):
    assert cli.main(lm_argv(workspace, tmp_path, "--engine", "flower")) == 0
    _same_adapters(tmp_path / "3", inprocess)
    config = json.loads((tmp_path / "3" / "config.json").read_text())
    assert config["engine"] == "flower"


def test_simulation_engine_image_task(tmp_path):
    from rblora.data.prepare import main as prepare_main

    build_tiny_vit(tmp_path / "vit")
    argv = ["3", "--source", "digits", "--partition", "iid", "--pool_size", "90"]
    assert prepare_main([*argv, "--test_per_category", "3", "--output_dir", str(tmp_path)]) == 0
    train = [
        "--global_model", str(tmp_path / "vit"), "--data_path", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), "--num_clients", "3", "--client_ranks", "2,4,8",
        "--num_communication_rounds", "2", "--local_num_epochs", "1", "--local_batch_size", "8",
        "--local_micro_batch_size", "8", "--bf16", "false", "--no_progress", "--engine", "flower",
    ]  # fmt: skip
    assert cli.main(train) == 0
    rounds = [r for r in metrics(tmp_path / "out" / "3") if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["eval"]["suites"]["test"]["count"] == 30
    assert (tmp_path / "out" / "3" / "round_2" / "global" / "adapter_model.safetensors").is_file()


def _deployment_args(workspace, out, *extra):
    argv = lm_argv(workspace, out, *extra)
    args, _ = parse_args(argv)
    return argv, node_configs(args, str(workspace / "data"))


def test_local_deployment_matches_the_in_process_engine(workspace, tmp_path, inprocess):
    argv, nodes = _deployment_args(workspace, tmp_path / "out")
    with LocalDeployment(tmp_path / "flower", nodes) as deployment:
        run_id = deployment.submit(argv)
        entry = deployment.wait(run_id, timeout=600)
        assert entry["status"] == "finished:completed", deployment.server_log(run_id)
        assert entry["network-traffic"]["total-bytes"] > 0
    _same_adapters(tmp_path / "out" / "3", inprocess)
    clients = [r for r in metrics(tmp_path / "out" / "3") if r["type"] == "client"]
    assert [c["rank"] for c in clients if c["round"] == 1] == [2, 4, 8]
    assert all(p.poll() is not None for p in deployment.processes.values())


def test_a_node_killed_in_round_2_is_left_out(workspace, tmp_path):
    argv, nodes = _deployment_args(
        workspace, tmp_path / "out", "--round_timeout", "40", "--num_communication_rounds", "3"
    )
    run = tmp_path / "out" / "3"
    with LocalDeployment(tmp_path / "flower", nodes) as deployment:
        run_id = deployment.submit(argv)
        deadline = time.time() + 300
        while not any(r.get("type") == "round" for r in _lines(run)):  # round 1 closed
            assert time.time() < deadline, deployment.server_log(run_id)
            time.sleep(0.5)
        deployment.kill_node(1)
        entry = deployment.wait(run_id, timeout=600)
        assert entry["status"] == "finished:completed", deployment.server_log(run_id)
    rounds = [r for r in metrics(run) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "missing" not in rounds[0]
    for r in rounds[1:]:
        assert list(r["missing"]) == ["1"], r.get("missing")
    clients = [r for r in metrics(run) if r["type"] == "client"]
    assert sorted(c["client"] for c in clients if c["round"] == 2) == [0, 2]


def _lines(run):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
