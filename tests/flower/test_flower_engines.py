"""The Flower engines with real runtimes: Flower's simulation (Ray workers) and a local
deployment (a SuperLink and three SuperNodes as processes on 127.0.0.1, free ports).

Every process a test starts is stopped by its process group, also when the test fails.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import hostile
import pytest
from run_helpers import adapter_tensors, assert_same_global_updates, lm_argv, metrics
from tiny_models import build_tiny_vit

from rblora.federation import cli
from rblora.federation.options import parse_args
from rblora.flower.local import APP_DIR, LocalDeployment, node_configs


@pytest.fixture(scope="module")
def inprocess(workspace, tmp_path_factory):
    """The in-process engine's run of the same options (the reference)."""
    out = tmp_path_factory.mktemp("inprocess")
    assert cli.main(lm_argv(workspace, out)) == 0
    return out / "3"


def test_simulation_engine_language_model(workspace, tmp_path, inprocess):
    assert cli.main(lm_argv(workspace, tmp_path, "--engine", "flower")) == 0
    assert_same_global_updates(tmp_path / "3", inprocess)
    config = json.loads((tmp_path / "3" / "config.json").read_text())
    assert config["engine"] == "flower"
    # the per-item outcomes, written by the same round step as in-process
    rounds = {r["round"]: r for r in metrics(tmp_path / "3") if r["type"] == "round"}
    for t in (1, 2):
        name = Path("evaluation") / f"round_{t}.json"
        ours = json.loads((tmp_path / "3" / name).read_text())["suites"]["dev"]
        theirs = json.loads((inprocess / name).read_text())["suites"]["dev"]
        assert ours["ids"] == theirs["ids"] and len(ours["ids"]) == 6
        assert sum(ours["accuracy"]) / 6 == rounds[t]["eval"]["suites"]["dev"]["accuracy"]


def test_simulation_engine_image_task(tmp_path):
    from rblora.data.prepare import main as prepare_main

    build_tiny_vit(tmp_path / "vit")
    argv = ["3", "--source", "digits", "--partition", "iid", "--pool_size", "90"]
    assert prepare_main([*argv, "--test_per_category", "3", "--output_dir", str(tmp_path)]) == 0
    train = [
        "--global_model", str(tmp_path / "vit"), "--data_path", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), "--num_clients", "3", "--client_ranks", "2,4,8",
        "--num_communication_rounds", "3", "--local_num_epochs", "1", "--local_batch_size", "8",
        "--local_micro_batch_size", "8", "--bf16", "false", "--no_progress", "--engine", "flower",
        "--save_every", "2", "--keep_last", "1",
    ]  # fmt: skip
    assert cli.main(train) == 0
    run = tmp_path / "out" / "3"
    rounds = [r for r in metrics(run) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["eval"]["suites"]["test"]["count"] == 30
    # rounds 2 and 3 (the last) were written, round 2's deleted after round 3 (--keep_last 1)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("round_")) == ["round_3"]
    assert sorted(p.name for p in (run / "round_3").iterdir()) == [
        "client_0", "client_1", "client_2", "global"
    ]  # fmt: skip
    assert (run / "round_3" / "global" / "adapter_model.safetensors").is_file()


def _deployment_args(workspace, out, *extra):
    argv = lm_argv(workspace, out, *extra)
    args, _ = parse_args(argv)
    return argv, node_configs(args, str(workspace / "data"))


def split_folders(prepared: Path, root: Path, count: int) -> Path:
    """``prepared`` (a ``<K>`` folder) cut as a federation holds it: ``root/node<k>/<K>/`` has
    only client k's files (its training file and, when prepared, its own test split),
    ``root/server/<K>/`` only global_test.json and partition.json."""
    for k in range(count):
        (root / f"node{k}" / prepared.name).mkdir(parents=True)
        for name in (f"local_training_{k}.json", f"local_test_{k}.json"):
            if (prepared / name).is_file():
                shutil.copy(prepared / name, root / f"node{k}" / prepared.name)
    (root / "server" / prepared.name).mkdir(parents=True)
    for name in ("global_test.json", "partition.json"):
        shutil.copy(prepared / name, root / "server" / prepared.name)
    return root


def _split_nodes(root: Path, ranks) -> list[dict]:
    return [
        {"partition-id": k, "lora-rank": r, "data-path": str(root / f"node{k}")}
        for k, r in enumerate(ranks)
    ]


def _deploy(workdir: Path, nodes: list[dict], argv: list[str], app_dir=None, timeout=600):
    with LocalDeployment(workdir, nodes) as deployment:
        run_id = deployment.submit(argv, **({"app_dir": app_dir} if app_dir else {}))
        entry = deployment.wait(run_id, timeout=timeout)
        assert entry["status"] == "finished:completed", deployment.server_log(run_id)
        assert entry["network-traffic"]["total-bytes"] > 0
    assert all(p.poll() is not None for p in deployment.processes.values())
    return deployment


def test_local_deployment_matches_the_in_process_engine(workspace, tmp_path, inprocess):
    """Each SuperNode's data-path holds only its own client's file, the server's only the test
    set and the partition metadata: the in-process engine's global updates (to float rounding:
    the server sums the replies in the order they arrive)."""
    folders = split_folders(workspace / "data" / "3", tmp_path / "data", 3)
    argv = lm_argv(workspace, tmp_path / "out", data_path=folders / "server")
    _deploy(tmp_path / "flower", _split_nodes(folders, (2, 4, 8)), argv)
    assert_same_global_updates(tmp_path / "out" / "3", inprocess)
    clients = [r for r in metrics(tmp_path / "out" / "3") if r["type"] == "client"]
    assert sorted(c["rank"] for c in clients if c["round"] == 1) == [2, 4, 8]  # as they came


def test_local_deployment_of_the_image_task_on_split_folders(tmp_path):
    from rblora.data.prepare import main as prepare_main

    build_tiny_vit(tmp_path / "vit")
    prepare = ["3", "--source", "digits", "--partition", "iid", "--pool_size", "90"]
    assert prepare_main([*prepare, "--test_per_category", "3", "--output_dir", str(tmp_path)]) == 0
    folders = split_folders(tmp_path / "3", tmp_path / "split", 3)

    def argv(data, out):
        return [
            "--global_model", str(tmp_path / "vit"), "--data_path", str(data),
            "--output_dir", str(out), "--num_clients", "3", "--client_ranks", "2,4,8",
            "--num_communication_rounds", "2", "--local_num_epochs", "1",
            "--local_batch_size", "8", "--local_micro_batch_size", "8", "--bf16", "false",
            "--no_progress",
        ]  # fmt: skip

    assert cli.main(argv(tmp_path, tmp_path / "inprocess")) == 0
    _deploy(tmp_path / "flower", _split_nodes(folders, (2, 4, 8)),
            argv(folders / "server", tmp_path / "out"))  # fmt: skip
    assert_same_global_updates(tmp_path / "out" / "3", tmp_path / "inprocess" / "3")
    dense = [k for k in adapter_tensors(tmp_path / "out" / "3" / "round_2" / "global")
             if "classifier" in k]  # fmt: skip
    assert dense  # the head travelled and was averaged


def test_a_hostile_supernode_on_loopback_is_dropped_and_named(workspace, tmp_path):
    """A real SuperNode running a hostile ClientApp (tests/flower/hostile.py, shipped in a
    Flower App of its own): a node claiming a huge scale and one replying with another
    client's shapes are dropped, named; the round aggregates the honest one."""
    app = tmp_path / "hostile-app"
    app.mkdir()
    shutil.copy(Path(hostile.__file__), app / "hostile.py")
    text = (APP_DIR / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        text.replace('clientapp = "rblora.flower.client_app:app"', 'clientapp = "hostile:app"')
    )
    argv = lm_argv(workspace, tmp_path / "out", num_communication_rounds=1)
    nodes = node_configs(parse_args(argv)[0], str(workspace / "data"))
    nodes[1]["hostile"], nodes[2]["hostile"] = "scale", "other-rank"
    _deploy(tmp_path / "flower", nodes, argv, app_dir=app)
    (record,) = [r for r in metrics(tmp_path / "out" / "3") if r["type"] == "round"]
    assert sorted(record["missing"]) == ["1", "2"]
    assert "lora-alpha 16000000.0 differs from the server's 16.0" in record["missing"]["1"]
    assert "/A: shape (2, 32), expected (8, 32)" in record["missing"]["2"]
    clients = [r for r in metrics(tmp_path / "out" / "3") if r["type"] == "client"]
    assert [c["client"] for c in clients] == [0]


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


@pytest.mark.slow  # Ray, 120 virtual SuperNodes
def test_simulation_with_a_hundred_supernodes_matches_in_process_and_trains_clients_at_once(
    tmp_path,
):
    """120 virtual SuperNodes, a tenth of them a round (Poisson sampling), each ClientApp
    reserving one CPU (--client_num_cpus 1): Ray builds one actor per CPU, so two clients train at
    once on a 2-core machine; the global updates equal the in-process engine's (float rounding)."""
    import logging
    import os

    from rblora.data.prepare import main as prepare_main

    build_tiny_vit(tmp_path / "vit")
    prepare = ["120", "--source", "digits", "--partition", "iid", "--pool_size", "360"]
    assert prepare_main([*prepare, "--test_per_category", "3", "--output_dir", str(tmp_path)]) == 0

    def argv(out, *extra):
        return [
            "--global_model", str(tmp_path / "vit"), "--data_path", str(tmp_path),
            "--output_dir", str(out), "--num_clients", "120",
            "--client_ranks", ",".join(["2", "4", "8"] * 40), "--num_communication_rounds", "2",
            "--client_selection_frac", "0.1", "--client_sampling", "poisson",
            "--discovery_timeout", "600",
            "--local_num_epochs", "1", "--local_batch_size", "4", "--local_micro_batch_size", "4",
            "--bf16", "false", "--no_progress", *extra,
        ]  # fmt: skip

    pools: list[str] = []

    class Pools(logging.Handler):
        def emit(self, record):
            if "ActorPool" in record.getMessage():
                pools.append(record.getMessage())

    flwr_logger = logging.getLogger("flwr")
    handler, level = Pools(level=logging.DEBUG), flwr_logger.level
    flwr_logger.addHandler(handler)
    flwr_logger.setLevel(logging.DEBUG)
    try:
        assert cli.main(argv(tmp_path / "flower", "--engine", "flower", "--client_num_cpus",
                             "1")) == 0  # fmt: skip
    finally:
        flwr_logger.removeHandler(handler)
        flwr_logger.setLevel(level)
    assert pools == [f"Constructed ActorPool with: {os.cpu_count()} actors"]
    assert cli.main(argv(tmp_path / "inprocess")) == 0
    assert_same_global_updates(tmp_path / "flower" / "120", tmp_path / "inprocess" / "120")
    config = json.loads((tmp_path / "flower" / "120" / "config.json").read_text())
    assert config["client_sizes"] == [3] * 120


def test_client_resources_are_options_checked_against_the_machine(tmp_path):
    import os

    from rblora.flower.simulation import backend_config

    args, _ = parse_args(["--client_num_cpus", "0.5", "--client_num_gpus", "0"])
    config = backend_config(args)
    assert config["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert config["init_args"]["num_cpus"] == os.cpu_count()
    args, _ = parse_args(["--client_num_cpus", str(os.cpu_count() + 1)])
    with pytest.raises(ValueError, match="each client would need more CPUs than this machine"):
        backend_config(args)
    with pytest.raises(ValueError, match="client_num_gpus -1.0 must be a number >= 0"):
        parse_args(["--client_num_gpus", "-1"])


def test_local_deployment_of_fedsa_lora_keeps_b_and_the_test_split_on_each_node(local_ws, tmp_path):
    """Real SuperNodes, each holding its own client's training file and test split: FedSA-LoRA's
    B stays in the node's state folder, each node scores its own client, and the shared A and
    personalised figures are the in-process engine's."""
    extra = ("--method", "FedSA-LoRA", "--eval_personalized")
    assert cli.main(lm_argv(local_ws, tmp_path / "inprocess", *extra)) == 0
    folders = split_folders(local_ws / "data" / "3", tmp_path / "data", 3)
    argv = lm_argv(local_ws, tmp_path / "out", *extra, data_path=folders / "server")
    _deploy(tmp_path / "flower", _split_nodes(folders, (2, 4, 8)), argv)
    out, ref = tmp_path / "out" / "3", tmp_path / "inprocess" / "3"
    assert_same_global_updates(out, ref)  # B is zero in both: the A's are compared through it
    for t in (1, 2):
        a = adapter_tensors(out / f"round_{t}" / "global")
        b = adapter_tensors(ref / f"round_{t}" / "global")
        for key in a:
            assert float((a[key] - b[key]).abs().max()) <= 1e-5 * max(float(b[key].abs().max()), 1)
    ours = {r["round"]: r["eval"]["personalized"] for r in metrics(out) if r["type"] == "round"}
    theirs = {r["round"]: r["eval"]["personalized"] for r in metrics(ref) if r["type"] == "round"}
    for t in (1, 2):
        assert ours[t]["clients"] == 3 and "missing" not in ours[t]
        assert ours[t]["loss_mean"] == pytest.approx(theirs[t]["loss_mean"], rel=1e-4)
    for k in range(3):  # each node's B in its own folder; none on the server's side
        kept = list((folders / f"node{k}" / "3" / "client_state").rglob("*.safetensors"))
        assert sorted(p.name for p in kept) == ["round_1.safetensors", "round_2.safetensors"]
        assert {p.parent.name for p in kept} == {f"client_{k}"}
    assert not (out / "client_state").exists()
