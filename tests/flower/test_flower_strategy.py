"""The Flower strategy without processes: a test Grid hands messages to the ClientApp in this
process (serialising every message as Flower does), so bad and missing replies can be staged."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from run_helpers import adapter_tensors, lm_argv, metrics

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
    """Nodes live in this process: ``tamper(client, reply) -> reply | None`` edits replies."""

    __test__ = False

    def __init__(self, node_configs: dict[int, dict], tamper=None):
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={}
            )
            for node, cfg in node_configs.items()
        }
        self.tamper = tamper or (lambda client, reply: reply)
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
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            context = self.contexts[node]
            try:
                reply = client_app.app(_roundtrip(msg), context)
            except Exception as err:  # as Flower reports a ClientApp that raised
                reply = Message(Error(code=2, reason=repr(err)), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            if msg.metadata.message_type == "train":
                reply = self.tamper(int(context.node_config["partition-id"]), reply)
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
        (_nan_reply, "reply dropped: client 0 (id 1), module"),
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


def test_node_ranks_must_agree_with_explicit_ones(workspace, tmp_path):
    with pytest.raises(RunError, match=r"lora-rank \[2, 4, 4\] differ from the run's \[2, 4, 8\]"):
        _serve(workspace, tmp_path, _grid(ranks=(2, 4, 4)))


def test_a_partition_claimed_twice_is_refused(workspace, tmp_path):
    grid = TestGrid({1: {"partition-id": 0}, 2: {"partition-id": 0}})
    with pytest.raises(RunError, match="both have partition 0"):
        _serve(workspace, tmp_path, grid)


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
