"""The Flower strategy without processes: a test Grid hands messages to the ClientApp in this
process (serialising every message as Flower does), so bad and missing replies can be staged."""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid

import hostile
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from run_helpers import adapter_tensors, assert_same_global_updates, lm_argv, metrics, tb_scalars

from rblora.federation import cli
from rblora.federation.options import parse_args
from rblora.federation.rounds import RunError
from rblora.flower import client_app
from rblora.flower.server_app import serve


def _roundtrip(msg: Message) -> Message:
    """The message as a receiver sees it after Flower's serialisation."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    return inflate_object_from_contents(msg.object_id, contents)


class TestGrid(Grid):
    """Nodes live in this process and run ``app`` (rblora's ClientApp unless given).

    ``tamper(client, reply) -> reply | None`` edits train replies as the transport could (None:
    the reply never arrives); ``hidden``: node ids that appear only after the first train
    message (a node started late)."""

    __test__ = False

    def __init__(self, node_configs: dict[int, dict], tamper=None, app=None, hidden=()):
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={}
            )
            for node, cfg in node_configs.items()
        }
        self.tamper = tamper or (lambda client, reply: reply)
        self.app = app or client_app.app
        self.hidden = set(hidden)
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return [node for node in self.contexts if node not in self.hidden]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            context = self.contexts[node]
            try:
                reply = self.app(_roundtrip(msg), context)
            except Exception as err:  # as Flower reports a ClientApp that raised
                reply = Message(Error(code=2, reason=repr(err)), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            if msg.metadata.message_type == "train":
                self.hidden.clear()  # late nodes are up once the first round has started
                client = int(msg.content.config_records["config"]["client"])
                reply = self.tamper(client, reply)
            if reply is not None:
                self._replies[msg.metadata.message_id] = _roundtrip(reply)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Flower's Message needs a run identity outside its runtime
    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _grid(ranks=(2, 4, 8), tamper=None):
    return TestGrid(
        {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate(ranks)}, tamper
    )


def _serve(workspace, out, grid, *extra):
    """Serve on the in-process ``grid``: it answers within its push, so a reply that has not
    come by the first pull never comes (a 2 s round timeout instead of the hour's default)."""
    if "--round_timeout" not in extra:
        extra = ("--round_timeout", "2", *extra)
    args, given = parse_args(lm_argv(workspace, out, *extra))
    return serve(grid, args, given)


def test_same_global_adapters_as_the_in_process_engine(workspace, tmp_path):
    _serve(workspace, tmp_path / "flower", _grid())
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess")) == 0
    for t in (1, 2):
        a = adapter_tensors(tmp_path / "flower" / "3" / f"round_{t}" / "global")
        b = adapter_tensors(tmp_path / "inprocess" / "3" / f"round_{t}" / "global")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    records = metrics(tmp_path / "flower" / "3")
    clients = [r for r in records if r["type"] == "client"]
    assert {c["node"] for c in clients} == {100, 101, 102}
    assert all(c["bytes_up"] > 0 for c in clients)
    config = json.loads((tmp_path / "flower" / "3" / "config.json").read_text())
    assert config["engine"] == "flower" and config["client_ranks_resolved"] == [2, 4, 8]


def _nan_reply(client, reply):
    if client != 1:
        return reply
    arrays = reply.content.array_records["arrays"]
    key = next(k for k in arrays if k.endswith("/A"))
    tensors = dict(arrays.to_torch_state_dict())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    from flwr.app import ArrayRecord

    reply.content.array_records["arrays"] = ArrayRecord(tensors)
    return reply


@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (_nan_reply, "reply dropped: update/lora/"),
        (lambda k, r: None if k == 1 else r, "no reply within"),
        (
            lambda k, r: (
                Message(Error(code=5, reason="node unavailable"), reply_to=r) if k == 1 else r
            ),
            "error 5: node unavailable",
        ),
    ],
    ids=["nan", "silent", "error"],
)
def test_a_bad_or_missing_reply_is_left_out_and_named(workspace, tmp_path, tamper, fragment):
    if tamper is not _nan_reply:
        # an error reply must answer the message it replies to
        original = tamper

        def tamper(client, reply, original=original):
            out = original(client, reply)
            if out is not None and out is not reply:
                out.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
                out.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
            return out

    _serve(workspace, tmp_path, _grid(tamper=tamper))
    rounds = [r for r in metrics(tmp_path / "3") if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert list(r["missing"]) == ["1"] and fragment in r["missing"]["1"]
        assert "node 101" in r["missing"]["1"]
    clients = [r for r in metrics(tmp_path / "3") if r["type"] == "client"]
    assert sorted({c["client"] for c in clients}) == [0, 2]  # aggregated without client 1
    assert not (tmp_path / "3" / "round_1" / "client_1").exists()


def test_too_few_replies_stop_the_run(workspace, tmp_path):
    grid = _grid(tamper=lambda k, r: r if k == 0 else None)
    with pytest.raises(RunError, match=r"round 1: 1 of 3 selected clients replied, 2 needed"):
        _serve(workspace, tmp_path, grid, "--min_replies", "0.5")


def test_a_node_of_another_rank_is_refused_unless_node_ranks_are_asked_for(
    workspace, tmp_path, capsys
):
    """A node's lora-rank never silently becomes the run's: without --ranks_from_nodes the node
    is refused and named; with it, ranks given in the options must agree."""
    _serve(workspace, tmp_path / "a", _grid(ranks=(2, 4, 4)), "--discovery_timeout", "1",
           "--num_communication_rounds", "1")  # fmt: skip
    assert (
        "node 102 refused: partition 2: the node's lora-rank 4 differs from the run's 8 "
        "(--ranks_from_nodes takes the nodes' ranks)" in capsys.readouterr().err
    )
    (record,) = [r for r in metrics(tmp_path / "a" / "3") if r["type"] == "round"]
    assert record["missing"] == {"2": "no node has answered for this client"}
    with pytest.raises(RunError, match=r"lora-rank \[2, 4, 4\] differ from the run's \[2, 4, 8\]"):
        _serve(workspace, tmp_path / "b", _grid(ranks=(2, 4, 4)), "--ranks_from_nodes")
    args, given = parse_args(lm_argv(workspace, tmp_path / "c", "--ranks_from_nodes"))
    args.client_ranks = None  # no ranks in the options: the nodes' are taken
    serve(_grid(ranks=(2, 4, 4)), args, given - {"client_ranks"})
    config = json.loads((tmp_path / "c" / "3" / "config.json").read_text())
    assert config["client_ranks_resolved"] == [2, 4, 4]


# ---------------------------------------------------------------------- the server trusts nothing
def _hostile_grid(kind, client=1):
    configs = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    configs[100 + client]["hostile"] = kind
    return TestGrid(configs, app=hostile.app)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("scale", "lora-alpha 16000000.0 differs from the server's 16.0"),
        ("examples", "num-examples 1000000000 differs from the server's 12"),
        ("head-only", "missing arrays [update/lora/"),
        ("missing-array", "missing arrays [update/lora/model.layers.0.self_attn.q_proj/B]"),
        ("float64", "dtype float64, not float32"),
        ("float16", "dtype float16, not float32"),
        ("extra-array", "unexpected arrays [update/lora/not.a.module/A]"),
        ("other-rank", "/A: shape (8, 32), expected (4, 32)"),
        ("nan", "holds NaN or inf"),
        ("unknown-meta", "unexpected metadata [server-please]"),
        ("huge-metric", "metrics are not JSON (an integer of 401 digits)"),
        ("nested-metrics", "metrics are 200000 characters, at most 4096"),
        ("string-array", "dtype <U1, not float32"),
        ("lying-header", "declared float32 (4, 32), holds float64 (2, 32)"),
    ],
)
def test_a_hostile_reply_is_dropped_and_named(workspace, tmp_path, kind, fragment):
    _serve(workspace, tmp_path, _hostile_grid(kind), "--num_communication_rounds", "1")
    (record,) = [r for r in metrics(tmp_path / "3") if r["type"] == "round"]
    assert list(record["missing"]) == ["1"]
    assert "node 101: reply dropped: " in record["missing"]["1"]
    assert fragment in record["missing"]["1"], record["missing"]["1"]
    clients = [r for r in metrics(tmp_path / "3") if r["type"] == "client"]
    assert [c["client"] for c in clients] == [0, 2]  # aggregated without client 1
    assert not (tmp_path / "3" / "round_1" / "client_1").exists()


def test_a_nodes_metrics_never_set_its_records_identity(workspace, tmp_path):
    grid = _hostile_grid("identity-metrics")
    _serve(workspace, tmp_path, grid, "--num_communication_rounds", "1")
    records = metrics(tmp_path / "3")
    clients = [r for r in records if r["type"] == "client"]
    assert [c["client"] for c in clients] == [0, 1, 2]  # the update itself was sound
    one = clients[1]
    assert (one["round"], one["rank"], one["num_examples"], one["node"]) == (1, 4, 12, 101)
    assert "loss" not in one and "note" not in one and "seconds" not in one and one["steps"] == 3
    assert all(r["round"] in (1,) for r in records)  # no round-99 line
    round_1 = [r for r in records if r["type"] == "round"][0]
    assert "missing" not in round_1 and round_1["train_loss"] is not None
    _serve(workspace, tmp_path, _hostile_grid("identity-metrics"), "--resume")  # resumable


def test_same_options_with_a_validation_split_on_every_node(workspace, tmp_path):
    extra = ("--local_val_set_size", "2", "--num_communication_rounds", "1")
    _serve(workspace, tmp_path / "flower", _grid(), *extra)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", *extra)) == 0
    a = adapter_tensors(tmp_path / "flower" / "3" / "round_1" / "global")
    b = adapter_tensors(tmp_path / "inprocess" / "3" / "round_1" / "global")
    assert all(torch.equal(a[k], b[k]) for k in a)
    clients = [r for r in metrics(tmp_path / "flower" / "3") if r["type"] == "client"]
    assert [c["num_examples"] for c in clients] == [6, 10, 14] and all(
        "val_loss" in c for c in clients
    )


def _split_folders(workspace, root):
    """The prepared folder cut as a federation holds it: each node's folder has only its own
    client's file, the server's only global_test.json and partition.json."""
    source = workspace / "data" / "3"
    for k in range(3):
        (root / f"node{k}" / "3").mkdir(parents=True)
        shutil.copy(source / f"local_training_{k}.json", root / f"node{k}" / "3")
    (root / "server" / "3").mkdir(parents=True)
    for name in ("global_test.json", "partition.json"):
        shutil.copy(source / name, root / "server" / "3")
    return root


def test_each_node_holds_only_its_own_file_and_the_server_none(workspace, tmp_path):
    folders = _split_folders(workspace, tmp_path / "data")
    configs = {
        100 + k: {"partition-id": k, "lora-rank": r, "data-path": str(folders / f"node{k}")}
        for k, r in enumerate((2, 4, 8))
    }
    argv = lm_argv(workspace, tmp_path / "flower", data_path=folders / "server")
    args, given = parse_args(argv)
    serve(TestGrid(configs), args, given)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess")) == 0
    for t in (1, 2):
        a = adapter_tensors(tmp_path / "flower" / "3" / f"round_{t}" / "global")
        b = adapter_tensors(tmp_path / "inprocess" / "3" / f"round_{t}" / "global")
        assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "flower" / "3" / "config.json").read_text())
    assert config["client_sizes"] == [8, 12, 16]  # from the server's partition.json


# ---------------------------------------------------------------------- discovery
def test_a_malformed_discovery_answer_is_refused_and_the_run_goes_on(workspace, tmp_path, capsys):
    _serve(
        workspace, tmp_path, _hostile_grid("malformed-answer"), "--discovery_timeout", "1",
        "--num_communication_rounds", "1",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert (
        "node 101 refused: malformed discovery answer: partition-ids 'one' is not a list of "
        "1..3 integers" in err
    )
    assert "starting with 2 of 3 clients; no node for client(s) [1]" in err
    (record,) = [r for r in metrics(tmp_path / "3") if r["type"] == "round"]
    assert record["missing"] == {"1": "no node has answered for this client"}


def test_a_partition_claimed_twice_is_refused_for_both_nodes(workspace, tmp_path):
    nodes = {1: {"partition-id": 0}, 2: {"partition-id": 0}, 3: {"partition-id": 1},
             4: {"partition-id": 2}}  # fmt: skip
    claimed = r"partition 0 is claimed by nodes \[1, 2\] \(without --node_keys the server cannot"
    refused = rf"no node for client\(s\) \[0\] \(refused: node 1: {claimed}.*; node 2: {claimed}"
    with pytest.raises(RunError, match=refused):
        _serve(workspace, tmp_path, TestGrid(nodes), "--discovery_timeout", "1",
               "--min_replies", "3")  # fmt: skip


class KeyedGrid(TestGrid):
    """A test Grid whose nodes hold public keys, as a SuperLink with SuperNode authentication
    reports them (``NodeInfo.public_key``, PEM)."""

    __test__ = False

    def __init__(self, node_configs, keys: dict[int, bytes], **kwargs):
        super().__init__(node_configs, **kwargs)
        self.keys = keys

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.get_node_ids()]


def _key_pair():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return pem, ssh


def test_with_node_keys_a_node_claiming_another_partition_is_refused_alone(
    workspace, tmp_path, capsys
):
    """--node_keys binds each partition to the key its node registered with: the hostile node
    claiming partition 1 is refused, the honest node of partition 1 trains."""
    pairs = {k: _key_pair() for k in range(4)}
    folder = tmp_path / "keys"
    folder.mkdir()
    for k in range(3):
        (folder / f"node{k}.pub").write_bytes(pairs[k][1])  # OpenSSH, as flwr supernode register
    (folder / "keys.json").write_text(json.dumps({str(k): f"node{k}.pub" for k in range(3)}))
    configs = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    configs[103] = {"partition-id": 2, "lora-rank": 4, "hostile": "claim", "claim": 1}
    keys = {100 + k: pairs[k][0] for k in range(4)}  # PEM, as the SuperLink reports them
    grid = KeyedGrid(configs, keys, app=hostile.app)
    _serve(workspace, tmp_path / "run", grid, "--node_keys", str(folder / "keys.json"),
           "--num_communication_rounds", "1", "--discovery_timeout", "1")  # fmt: skip
    err = capsys.readouterr().err
    assert "node 103 refused: claims partition 1 but does not hold the key --node_keys binds" in err
    (record,) = [r for r in metrics(tmp_path / "run" / "3") if r["type"] == "round"]
    assert "missing" not in record
    clients = [r for r in metrics(tmp_path / "run" / "3") if r["type"] == "client"]
    assert [(c["client"], c["node"]) for c in clients] == [(0, 100), (1, 101), (2, 102)]


def test_without_node_keys_a_claim_of_another_partition_costs_both(workspace, tmp_path, capsys):
    configs = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    configs[103] = {"partition-id": 2, "lora-rank": 4, "hostile": "claim", "claim": 1}
    _serve(workspace, tmp_path, TestGrid(configs, app=hostile.app), "--discovery_timeout", "1",
           "--num_communication_rounds", "1")  # fmt: skip
    err = capsys.readouterr().err
    assert "partition 1 is claimed by nodes [101, 103] (without --node_keys" in err
    (record,) = [r for r in metrics(tmp_path / "3") if r["type"] == "round"]
    assert record["missing"] == {"1": "no node has answered for this client"}


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"0": "missing.pub"}, "partition 0:"),
        ({"7": "node0.pub"}, "'7' is not a partition id 0..2"),
        ({"0": "bad.pub"}, "not an OpenSSH or PEM public key"),
    ],
)
def test_a_bad_node_keys_file_is_refused_in_one_line(workspace, tmp_path, content, fragment):
    (tmp_path / "node0.pub").write_bytes(_key_pair()[1])
    (tmp_path / "bad.pub").write_text("not a key")
    (tmp_path / "keys.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=re.escape(fragment)):
        _serve(workspace, tmp_path / "run", _grid(), "--node_keys", str(tmp_path / "keys.json"))


def test_a_node_serving_several_partitions_gives_the_in_process_updates(workspace, tmp_path):
    """One node serves partitions 0 and 1 (``partition-id="0-1"``), another partition 2: each
    client trains from its own message and the global updates are the in-process engine's."""
    grid = TestGrid({100: {"partition-id": "0-1"}, 101: {"partition-id": 2}})
    _serve(workspace, tmp_path / "flower", grid)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess")) == 0
    for t in (1, 2):
        a = adapter_tensors(tmp_path / "flower" / "3" / f"round_{t}" / "global")
        b = adapter_tensors(tmp_path / "inprocess" / "3" / f"round_{t}" / "global")
        assert all(torch.equal(a[k], b[k]) for k in a)
    clients = [r for r in metrics(tmp_path / "flower" / "3") if r["type"] == "client"]
    assert sorted((c["client"], c["node"]) for c in clients if c["round"] == 1) == [
        (0, 100), (1, 100), (2, 101)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("0-x", "'0-x' is not an integer or a range"),
        ("5-2", "is empty or too large"),
        (True, "not an integer or a range"),
    ],
)
def test_a_bad_partition_range_is_refused(value, fragment):
    from rblora.flower.client_app import parse_partitions

    assert parse_partitions("0-2,7, 9") == [0, 1, 2, 7, 9] and parse_partitions(4) == [4]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_partitions(value)


def test_a_claimed_size_beyond_the_bound_is_refused_without_partition_json(
    workspace, tmp_path, capsys
):
    """Without partition.json a node's claimed example count is its weight: 10**18 is refused
    (--max_client_examples), the run goes on without it."""
    folders = _split_folders(workspace, tmp_path / "data")
    (folders / "server" / "3" / "partition.json").unlink()
    configs = {
        100 + k: {"partition-id": k, "lora-rank": r, "data-path": str(folders / f"node{k}")}
        for k, r in enumerate((2, 4, 8))
    }
    configs[101]["hostile"] = "huge-size"
    argv = lm_argv(workspace, tmp_path / "run", "--discovery_timeout", "1",
                   "--num_communication_rounds", "1", data_path=folders / "server")  # fmt: skip
    args, given = parse_args(argv)
    serve(TestGrid(configs, app=hostile.app), args, given)
    assert (
        "node 101 refused: partition 1: the node claims 1000000000000000000 training examples, "
        "above --max_client_examples 1000000" in capsys.readouterr().err
    )
    config = json.loads((tmp_path / "run" / "3" / "config.json").read_text())
    assert config["client_sizes"] == [8, None, 16]


def test_a_node_holding_other_data_is_refused(workspace, tmp_path):
    other = tmp_path / "other" / "3"
    other.mkdir(parents=True)
    records = json.loads((workspace / "data" / "3" / "local_training_1.json").read_text())
    (other / "local_training_1.json").write_text(json.dumps(records[:-1]))
    nodes = {100: {"partition-id": 0}, 101: {"partition-id": 1, "data-path": str(other.parent)},
             102: {"partition-id": 2}}  # fmt: skip
    with pytest.raises(RunError, match=r"node 101: partition 1: the node holds 11 training "
                       r"examples, the server's partition.json says 12"):  # fmt: skip
        _serve(workspace, tmp_path / "out", TestGrid(nodes), "--discovery_timeout", "1",
               "--min_replies", "3")  # fmt: skip


def test_discovery_waits_then_names_the_missing_clients(workspace, tmp_path):
    grid = TestGrid({100: {"partition-id": 0}})
    started = time.perf_counter()
    with pytest.raises(RunError, match=r"nodes for 1 of 3 clients answered, 2 needed "
                       r"\(--min_replies\); no node for client\(s\) \[1, 2\]"):  # fmt: skip
        _serve(workspace, tmp_path, grid, "--discovery_timeout", "2", "--min_replies", "2")
    assert time.perf_counter() - started >= 2


def test_a_node_that_starts_late_joins_at_the_next_round(workspace, tmp_path):
    grid = TestGrid(
        {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))},
        hidden={102},
    )
    _serve(workspace, tmp_path, grid, "--discovery_timeout", "1")
    rounds = [r for r in metrics(tmp_path / "3") if r["type"] == "round"]
    assert rounds[0]["missing"] == {"2": "no node has answered for this client"}
    assert "missing" not in rounds[1]
    clients = [(r["round"], r["client"]) for r in metrics(tmp_path / "3") if r["type"] == "client"]
    assert clients == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]


def test_a_node_trains_on_its_own_device_whatever_the_servers(workspace):
    options = json.loads(json.dumps(parse_args(lm_argv(workspace, workspace / "o"))[0].to_dict()))
    options["device"] = "cuda"  # the server's GPU; this node has none
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config={})  # fmt: skip
    assert client_app.client_args(options, context).device == "auto"
    context.node_config["device"] = "cpu"
    assert client_app.client_args(options, context).device == "cpu"
    query = RecordDict({"config": ConfigRecord({"train-args": json.dumps(options)})})
    reply = client_app.app(Message(query, dst_node_id=7, message_type="query"), context)
    assert not reply.has_error(), reply.error
    answer = dict(reply.content.config_records["config"])
    assert answer["partition-ids"] == [1] and answer["num-examples"] == [12]


def test_a_flower_run_resumes_after_its_checkpoint(workspace, tmp_path):
    _serve(workspace, tmp_path / "cut", _grid(), "--num_communication_rounds", "1")
    _serve(workspace, tmp_path / "cut", _grid(), "--resume")  # 2 rounds in all
    _serve(workspace, tmp_path / "full", _grid())
    for sub in ("round_2/global", "round_2/client_1"):
        a = adapter_tensors(tmp_path / "cut" / "3" / sub)
        b = adapter_tensors(tmp_path / "full" / "3" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = [r["round"] for r in metrics(tmp_path / "cut" / "3") if r["type"] == "round"]
    assert rounds == [1, 2]


def test_client_level_dp_gives_the_in_process_numbers(workspace, tmp_path):
    """The Flower server applies DP in the same round core: same noised globals (the noise from
    the seed, so both draw the same), same epsilon."""
    dp = ("--dp_clip", "0.5", "--dp_noise_multiplier", "0.8", "--method", "FlexLoRA",
          "--dp_noise_from_seed")  # fmt: skip
    _serve(workspace, tmp_path / "flower", _grid(), *dp)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", *dp)) == 0
    for t in (1, 2):
        a = adapter_tensors(tmp_path / "flower" / "3" / f"round_{t}" / "global")
        b = adapter_tensors(tmp_path / "inprocess" / "3" / f"round_{t}" / "global")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    eps = {
        name: [r["dp_epsilon"] for r in metrics(tmp_path / name / "3") if r["type"] == "round"]
        for name in ("flower", "inprocess")
    }
    assert eps["flower"] == eps["inprocess"] and len(eps["flower"]) == 2


def test_the_trackers_get_the_same_figures_from_both_engines(workspace, tmp_path):
    pytest.importorskip("tensorboard")
    extra = ("--eval_base", "--report_to", "tensorboard")
    _serve(workspace, tmp_path / "flower", _grid(), *extra)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", *extra)) == 0
    flower = tb_scalars(tmp_path / "flower" / "3" / "tensorboard")
    inprocess = tb_scalars(tmp_path / "inprocess" / "3" / "tensorboard")
    assert flower.keys() == inprocess.keys()
    assert {"dev/accuracy", "heldout/loss", "round/train_loss", "client_2/loss"} <= flower.keys()
    for tag, values in flower.items():
        assert [s for s, _ in values] == [s for s, _ in inprocess[tag]], tag  # each step once
        if tag.endswith(("loss", "accuracy", "steps", "tokens")):  # bytes: message sizes
            got, want = [v for _, v in values], [v for _, v in inprocess[tag]]
            assert got == pytest.approx(want, rel=1e-4), tag
    assert [s for s, _ in flower["dev/accuracy"]] == [0, 1, 2]


class RecordingGrid(TestGrid):
    """A test Grid that keeps the serialised bytes of every message sent to a node."""

    __test__ = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[bytes] = []

    def push_messages(self, messages):
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        messages = list(messages)
        for msg in messages:
            self.sent += [obj.deflate() for obj in get_all_nested_objects(msg).values()]
        return super().push_messages(messages)


def test_no_message_to_a_node_carries_the_noise_key(workspace, tmp_path):
    """Under DP with FLoRA (every node receives the running total, and the run's options with
    the seed): no byte string sent to any node holds the key, in any encoding."""
    import base64

    configs = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    grid = RecordingGrid(configs)
    _serve(workspace, tmp_path, grid, "--method", "FLoRA", "--dp_clip", "0.5",
           "--dp_noise_multiplier", "0.8")  # fmt: skip
    state = json.loads((tmp_path / "3" / "checkpoint" / "state.json").read_text())
    key = bytes.fromhex(state["dp"]["noise_key"])
    assert len(grid.sent) > 10
    forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]
    for blob in grid.sent:
        assert not any(form in blob for form in forms)


def _opacus_epsilon(z, q, rounds, delta=1e-5):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_poisson_sampling_on_flower_is_accounted_at_its_rate_and_may_be_empty(
    workspace, tmp_path, monkeypatch
):
    """Flower: Poisson sampling at q = 0.5 gives Opacus's epsilon at 0.5; a round that selects
    nobody sends no message, releases the noise alone and needs no reply."""
    from rblora.federation.server import FederatedServer

    original = FederatedServer.select
    monkeypatch.setattr(
        FederatedServer, "select", lambda self, t: [] if t == 1 else original(self, t)
    )
    grid = RecordingGrid({100 + k: {"partition-id": k} for k in range(3)})
    _serve(workspace, tmp_path, grid, "--client_sampling", "poisson", "--client_selection_frac",
           "0.5", "--dp_clip", "0.5", "--dp_noise_multiplier", "0.8")  # fmt: skip
    rounds = metrics(tmp_path / "3")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.8, 0.5, r["round"]))
        assert "missing" not in r and "selected" not in r  # who took part stays private
    private = [json.loads(x) for x in (tmp_path / "3" / "private" / "metrics.jsonl").open()]
    first = [r for r in private if r["round"] == 1]
    assert [r["type"] for r in first] == ["round"] and first[0]["selected"] == []
    assert (tmp_path / "3" / "round_1" / "global" / "adapter_model.safetensors").is_file()


def test_fixed_selection_on_flower_is_accounted_at_q_1(workspace, tmp_path):
    """Flower, fixed-size selection of 2 of 3 clients (q = 2/3 < 1): no amplification, the
    epsilon is Opacus's at q = 1; the selection is in the private records only."""
    _serve(workspace, tmp_path, _grid(), "--client_selection_frac", "0.67", "--dp_clip", "0.5",
           "--dp_noise_multiplier", "0.8")  # fmt: skip
    rounds = metrics(tmp_path / "3")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.8, 1.0, r["round"]))
    private = [json.loads(x) for x in (tmp_path / "3" / "private" / "metrics.jsonl").open()]
    assert [len(r["selected"]) for r in private if r["type"] == "round"] == [2, 2]


def test_ffa_lora_sends_no_a_either_way_and_gives_the_in_process_adapters(workspace, tmp_path):
    """FFA-LoRA's protocol on Flower: a start carries B alone (A is drawn by the node from the
    run's seed), a reply carries B alone (the server draws A itself), and the global adapters
    are the in-process engine's."""
    carried = []

    def app(msg, context):
        train = msg.metadata.message_type == "train"
        if train:
            carried.extend(msg.content.array_records["arrays"].keys())
        reply = client_app.app(msg, context)
        if train and reply.has_content():
            carried.extend(reply.content.array_records["arrays"].keys())
        return reply

    nodes = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    _serve(workspace, tmp_path / "flower", TestGrid(nodes, app=app), "--method", "FFA-LoRA")
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", "--method", "FFA-LoRA")) == 0
    for t in (1, 2):
        a = adapter_tensors(tmp_path / "flower" / "3" / f"round_{t}" / "global")
        b = adapter_tensors(tmp_path / "inprocess" / "3" / f"round_{t}" / "global")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    factors = [k for k in carried if "/lora/" in k]
    assert factors and all(k.endswith("/B") for k in factors)
    clients = [r for r in metrics(tmp_path / "flower" / "3") if r["type"] == "client"]
    assert len({c["round"] for c in clients}) == 2 and all(c["bytes_up"] > 0 for c in clients)


def test_rolora_sends_the_round_s_trained_factor_up_and_gives_the_in_process_adapters(
    workspace, tmp_path
):
    """RoLoRA's alternating protocol on Flower: round 1's replies carry B alone, round 2's A
    alone (the node reads the round from the message), round 2's starts carry both factors (B
    is held at round 1's global B), and the global adapters and a client's round-2 adapter are
    the in-process engine's."""
    carried = {}  # (round, "start" | "reply") -> factor names seen

    def app(msg, context):
        train = msg.metadata.message_type == "train"
        reply = client_app.app(msg, context)
        if train:
            round_ = int(msg.metadata.group_id)
            for kind, m in (("start", msg), ("reply", reply)):
                if m.has_content():
                    keys = m.content.array_records["arrays"].keys()
                    names = {k.rsplit("/", 1)[1] for k in keys if "/lora/" in k}
                    carried.setdefault((round_, kind), set()).update(names)
        return reply

    nodes = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    extra = ("--method", "RoLoRA")
    _serve(workspace, tmp_path / "flower", TestGrid(nodes, app=app), *extra)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", *extra)) == 0
    assert carried[1, "reply"] == {"B"} and carried[2, "reply"] == {"A"}
    assert carried.get((1, "start"), set()) == set() and carried[2, "start"] == {"A", "B"}
    for sub in ("round_1/global", "round_2/global", "round_2/client_2"):
        a = adapter_tensors(tmp_path / "flower" / "3" / sub)
        b = adapter_tensors(tmp_path / "inprocess" / "3" / sub)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_fedex_lora_sends_its_residual_and_gives_the_in_process_adapters(workspace, tmp_path):
    """FedEx-LoRA on Flower: round 2's starts carry the residual the base holds (as FLoRA's
    merged total travels) and the averaged factors; the global adapters (the base's residual
    plus the factors) and a client's round-2 adapter are the in-process engine's."""
    deltas = []

    def app(msg, context):
        if msg.metadata.message_type == "train" and int(msg.metadata.group_id) == 2:
            deltas.extend(k for k in msg.content.array_records["arrays"] if "/delta/" in k)
        return client_app.app(msg, context)

    nodes = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    _serve(workspace, tmp_path / "flower", TestGrid(nodes, app=app), "--method", "FedEx-LoRA")
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", "--method", "FedEx-LoRA")) == 0
    assert deltas  # every round-2 start carries the residual
    assert_same_global_updates(tmp_path / "flower" / "3", tmp_path / "inprocess" / "3")
    _same_client_adapter(tmp_path, "round_2/client_2")


def test_hetlora_sparsity_weights_give_the_in_process_adapters(workspace, tmp_path):
    """HETLoRA as published (its weights need the whole round, aggregated from the round's
    list): on Flower the global adapters and a client's round-2 adapter are the in-process
    engine's."""
    nodes = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    _serve(workspace, tmp_path / "flower", TestGrid(nodes), "--method", "HETLoRA")
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", "--method", "HETLoRA")) == 0
    assert_same_global_updates(tmp_path / "flower" / "3", tmp_path / "inprocess" / "3")
    _same_client_adapter(tmp_path, "round_2/client_2")


def test_hetlora_pruned_replies_travel_and_give_the_in_process_adapters(workspace, tmp_path):
    """HETLoRA with rank self-pruning on Flower: a node that pruned replies at its smaller rank,
    the server checks it against its own rank of the client (never larger) and takes it; the
    global adapters and the clients' round-2 adapters (the rank-2 client's pruned to 1) are the
    in-process engine's."""
    argv = ("--method", "HETLoRA", "--hetlora_lambda", "50", "--hetlora_prune_gamma", "0.5")
    nodes = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    _serve(workspace, tmp_path / "flower", TestGrid(nodes), *argv)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", *argv)) == 0
    assert_same_global_updates(tmp_path / "flower" / "3", tmp_path / "inprocess" / "3")
    for k in range(3):
        a = adapter_tensors(tmp_path / "flower" / "3" / "round_2" / f"client_{k}")
        b = adapter_tensors(tmp_path / "inprocess" / "3" / "round_2" / f"client_{k}")
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    pruned = adapter_tensors(tmp_path / "flower" / "3" / "round_2" / "client_0")
    assert {v.shape[0] for key, v in pruned.items() if key.endswith("lora_A.weight")} == {1}


def test_a_pruned_reply_above_the_client_rank_is_dropped(workspace, tmp_path):
    """A node may reply smaller than its rank under HETLoRA, never larger: a reply widened to
    rank 3 for the rank-2 client is dropped, named in the round's missing clients."""

    def widen(client, reply):
        if client != 0:
            return reply
        from flwr.app import ArrayRecord

        tensors = dict(reply.content.array_records["arrays"].to_torch_state_dict())
        for key in [k for k in tensors if k.startswith("update/lora/")]:
            t = tensors[key]
            tensors[key] = torch.cat([t, t[:1]]) if key.endswith("/A") else torch.cat(
                [t, t[:, :1]], dim=1)  # fmt: skip
        reply.content.array_records["arrays"] = ArrayRecord(tensors)
        return reply

    nodes = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    grid = TestGrid(nodes, tamper=widen)
    _serve(workspace, tmp_path, grid, "--method", "HETLoRA", "--min_replies", "2")
    rounds = [r for r in metrics(tmp_path / "3") if r["type"] == "round" and r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert list(r["missing"]) == ["0"]
        assert "client 0 replied at rank 3; the server expects at most 2" in r["missing"]["0"]


def test_the_threshold_redistribution_gives_the_in_process_adapters(workspace, tmp_path):
    """FLoRIST's threshold is the server's: on Flower, --method FLoRIST gives the global
    adapters, every client's round-2 adapter and the kept ranks of the in-process engine's
    FlexLoRA with --reduction_method threshold (the same rule under its two names)."""
    energy = ("--svd_energy", "0.5")
    _serve(workspace, tmp_path / "flower", _grid(), "--method", "FLoRIST", *energy)
    extra = ("--method", "FlexLoRA", "--reduction_method", "threshold", *energy)
    assert cli.main(lm_argv(workspace, tmp_path / "inprocess", *extra)) == 0
    for sub in ("round_1/global", "round_2/global", "round_2/client_2"):
        a = adapter_tensors(tmp_path / "flower" / "3" / sub)
        b = adapter_tensors(tmp_path / "inprocess" / "3" / sub)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    flower, inprocess = (
        [r for r in metrics(tmp_path / engine / "3") if r["type"] == "round" and r["round"] > 0]
        for engine in ("flower", "inprocess")
    )
    assert {(r["method"], r["reduction"]) for r in flower} == {("FLoRIST", "threshold")}
    assert [r["threshold_rank"] for r in flower] == [r["threshold_rank"] for r in inprocess]


def _same_client_adapter(tmp_path, sub: str) -> None:
    """The Flower run's client adapter ``sub`` is the in-process run's, to float rounding."""
    a = adapter_tensors(tmp_path / "flower" / "3" / sub)
    b = adapter_tensors(tmp_path / "inprocess" / "3" / sub)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_fedsa_lora_sends_a_alone_keeps_b_on_the_node_and_gives_the_in_process_figures(
    local_ws, tmp_path
):
    """FedSA-LoRA on Flower: starts and replies carry A alone, each node keeps its client's B
    in its own state folder (the server's run folder holds none), the node scores its client's
    model itself, and the shared A and personalised figures are the in-process engine's."""
    carried = []

    def arrays(msg):
        return list(msg.content.array_records.get("arrays", {}).keys())

    def app(msg, context):
        carried.extend(arrays(msg))
        reply = client_app.app(msg, context)
        if reply.has_content():
            carried.extend(arrays(reply))
        return reply

    state = tmp_path / "node-state"
    nodes = {100 + k: {"partition-id": k, "lora-rank": r, "state-dir": str(state)}
             for k, r in enumerate((2, 4, 8))}  # fmt: skip
    extra = ("--method", "FedSA-LoRA", "--eval_personalized")
    _serve(local_ws, tmp_path / "flower", TestGrid(nodes, app=app), *extra)
    assert cli.main(lm_argv(local_ws, tmp_path / "inprocess", *extra)) == 0
    factors = [k for k in carried if "/lora/" in k]
    assert factors and all(k.endswith("/A") for k in factors)
    flower, inproc = tmp_path / "flower" / "3", tmp_path / "inprocess" / "3"
    for t in (1, 2):
        a, b = adapter_tensors(flower / f"round_{t}" / "global"), adapter_tensors(
            inproc / f"round_{t}" / "global")  # fmt: skip
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    ours = {r["round"]: r["eval"]["personalized"] for r in metrics(flower) if r["type"] == "round"}
    theirs = {
        r["round"]: r["eval"]["personalized"] for r in metrics(inproc) if r["type"] == "round"
    }
    for t in (1, 2):
        assert ours[t]["clients"] == 3 and "missing" not in ours[t]
        for key in ("loss_mean", "loss_sd"):
            assert ours[t][key] == pytest.approx(theirs[t][key], rel=1e-4, abs=1e-6)
    assert not (flower / "client_state").exists()
    kept = sorted(p.name for p in state.rglob("*.safetensors"))
    assert kept == sorted(["round_1.safetensors", "round_2.safetensors"] * 3)
    # an --overwrite run of the same folder, method and seed keeps nothing of the first one's
    _serve(local_ws, tmp_path / "flower", TestGrid(nodes), *extra, "--overwrite")
    assert len(list(state.iterdir())) == 2


def test_a_node_whose_personalised_figures_do_not_fit_is_named_and_left_out(local_ws, tmp_path):
    def app(msg, context):
        reply = client_app.app(msg, context)
        if msg.metadata.message_type != "evaluate":
            return reply
        if int(msg.content.config_records["config"]["client"]) == 1:
            config = dict(reply.content.config_records["config"])
            config["figures"] = json.dumps({"loss": 0.1, "examples": 99})  # not its count
            reply = Message(RecordDict({"arrays": reply.content.array_records["arrays"],
                                        "config": ConfigRecord(config)}), reply_to=msg)  # fmt: skip
        return reply

    nodes = {100 + k: {"partition-id": k, "lora-rank": r} for k, r in enumerate((2, 4, 8))}
    _serve(local_ws, tmp_path / "flower", TestGrid(nodes, app=app), "--eval_personalized")
    for r in metrics(tmp_path / "flower" / "3"):
        if r["type"] == "round":
            p = r["eval"]["personalized"]
            assert p["clients"] == 2 and list(p["missing"]) == ["1"]
            assert "scored 99 held-out examples; partition.json says 3" in p["missing"]["1"]
