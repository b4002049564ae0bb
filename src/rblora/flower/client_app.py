"""rblora's Flower ClientApp: one client's data and local training, with the same task code as
the in-process engine.

A node says which client it is in its node config::

    flower-supernode ... --node-config 'partition-id=3 lora-rank=64 data-path="/data/prepared"'

``partition-id`` (required): the client's index in the prepared data folder, or several
(``"0-99"``, ``"3,5,10-12"``: one node serving many clients, one message each); ``lora-rank``
(optional): its LoRA rank (else the run's ``client_ranks``); ``data-path`` (optional): the
prepared folder on this machine (else the run's ``data_path``); ``device`` (optional): where this
node trains (``auto``, ``cpu``, ``cuda``, ...; default ``auto``: this machine's GPU if it has one,
whatever device the server uses); ``state-dir`` (optional): where the node keeps its clients'
own factors between rounds under a method that keeps one on the client (FedSA-LoRA's B;
default ``<data-path>/<K>/client_state``). Only the client's own file
``<data-path>/<K>/local_training_<partition-id>.json`` is read (for images, its index file and the
embedded image set it names); the node needs no other client's file and no test set.

Messages: ``query`` (who are you: partition, rank, examples), ``train`` (start adapter in,
update out) and, with ``--eval_personalized``, ``evaluate`` (the client's model after the round
in, its figures on its own held-out split out). The run's options travel in every message, so
the node needs nothing but its node config. The task is built once per process and reused (a
simulation worker serves many rounds; a deployed SuperNode starts a fresh process per message
and rebuilds it). The node's own held-out split ``local_test_<partition-id>.json`` is read only
for ``evaluate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from rblora.aggregation import get_method
from rblora.federation.client_state import node_store
from rblora.federation.options import TrainArgs
from rblora.federation.personal import score_client
from rblora.federation.rounds import client_update, train_client
from rblora.flower.records import CONFIG, from_content, to_content
from rblora.protocol.codec import decode_start, encode_update
from rblora.protocol.factors import FactorPlan
from rblora.protocol.types import ClientSpec, clean_metrics

app = ClientApp()

_TASKS: dict[str, Any] = {}
"""Built client tasks of this process, by (options, partitions): each holds its clients' data."""
_MODELS: dict = {}
"""Loaded base models of this process, shared by its client tasks (loading is the slow part)."""
MAX_PARTITIONS = 100_000
"""The most partitions one node config may name."""


def parse_partitions(value: Any) -> list[int]:
    """A node config's ``partition-id``: an integer, or text of integers and ranges
    (``"0-99"``, ``"3,5,10-12"``); sorted, each once. ValueError naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"partition-id {value!r} is not an integer or a range")
    if isinstance(value, int):
        return [value]
    parts: set[int] = set()
    for piece in str(value).replace(" ", "").split(","):
        low, dash, high = piece.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(
                f"partition-id {value!r}: {piece!r} is not an integer or a range like 0-99"
            )
        first, last = int(low), int(high) if dash else int(low)
        if last < first or len(parts) + last - first + 1 > MAX_PARTITIONS:
            raise ValueError(f"partition-id {value!r}: {piece!r} is empty or too large")
        parts.update(range(first, last + 1))
    return sorted(parts)


def node_identity(context: Context) -> tuple[list[int], int | None, str | None]:
    """(the partitions this node serves, lora-rank or None, data-path or None) from the node
    config (``partition-id``: one, or several as ``"0-99"`` or ``"3,5,10-12"``)."""
    config = context.node_config
    if "partition-id" not in config:
        raise ValueError(
            f"node config {dict(config)} has no partition-id; start the SuperNode with "
            "--node-config 'partition-id=K lora-rank=R'"
        )
    rank = config.get("lora-rank")
    path = config.get("data-path")
    return parse_partitions(config["partition-id"]), (None if rank is None else int(rank)), path


def client_args(options: dict, context: Context) -> TrainArgs:
    """The run's options as this node uses them: its own data folder and its own device (the
    server's ``--device`` is where the server evaluates); precision as the run recorded it."""
    _, _, path = node_identity(context)
    local = {"device": str(context.node_config.get("device", "auto"))}
    if path:
        local["data_path"] = str(path)
    return TrainArgs(**{**options, **local})


def client_task(args: TrainArgs, clients: list[int]):
    """The task of this node's ``clients`` under ``args`` (their own data, no evaluation sets),
    built once per process."""
    from transformers.utils import logging as hf_logging

    from rblora.tasks import build_task

    key = json.dumps([args.to_dict(), clients], sort_keys=True)
    if key not in _TASKS:
        hf_logging.disable_progress_bar()  # this process is a ClientApp: no bars in its log
        _TASKS[key] = build_task(
            args, log=lambda _: None, clients=list(clients), evaluation=False, models=_MODELS
        )
    return _TASKS[key]


def client_store(args: TrainArgs, context: Context, plan: FactorPlan, state_id: str = ""):
    """Where this node keeps its clients' own factors (a method's ``local`` role, FedSA-LoRA's
    B) between rounds, on this machine: the node config's ``state-dir``, else
    ``<its data folder>/client_state``, under a folder named by a digest of the run (its
    output folder, method, seed, client count and ``state_id``, the run's public label from
    its ``config.json``: the same after a resume, another for an ``--overwrite`` run). None
    when the method keeps nothing on the clients. The server never sees it."""
    from rblora.data.federated import resolve_folder

    if not plan.local:
        return None
    state = context.node_config.get("state-dir")
    root = Path(str(state)) if state else resolve_folder(args.data_path, args.num_clients)
    key = json.dumps([str(args.run_dir()), get_method(args.method).name, args.seed,
                      args.num_clients, str(state_id)])  # fmt: skip
    return node_store(root if state else root / "client_state", key, plan.local)


def _options(msg: Message) -> dict:
    return json.loads(msg.content.config_records[CONFIG]["train-args"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which clients this node serves: their partitions, its rank (-1: the run's) and each
    one's training examples."""
    clients, rank, _ = node_identity(context)
    args = client_args(_options(msg), context)
    task = client_task(args, clients)
    answer = {"partition-ids": clients, "lora-rank": -1 if rank is None else rank,
              "num-examples": [task.num_examples(k) for k in clients]}  # fmt: skip
    return Message(RecordDict({CONFIG: ConfigRecord(answer)}), reply_to=msg)


@dataclass(frozen=True)
class ClientMessage:
    """A train or evaluate message as this node reads it: the client it is for (one of this
    node's, else ValueError), its options, task, protocol plan, start and kept-factor store."""

    args: TrainArgs
    task: Any
    spec: ClientSpec
    round_: int
    plan: FactorPlan
    start: Any
    store: Any
    meta: dict


def open_message(msg: Message, context: Context, plan_round_offset: int = 0) -> ClientMessage:
    """Read ``msg`` on this node; the plan is the method's protocol of the message's round plus
    ``plan_round_offset`` (1 for an evaluation: the start it carries is the next round's)."""
    tensors, meta = from_content(msg.content)
    clients, _, _ = node_identity(context)
    client = int(meta["client"])
    if client not in clients:
        raise ValueError(f"message for client {client} reached a node of partitions {clients}")
    args = client_args(json.loads(meta["train-args"]), context)
    task = client_task(args, clients)
    spec = ClientSpec(client, int(meta["rank"]), args.lora_alpha, args.use_rslora)
    round_ = int(meta["round"])
    plan = FactorPlan.for_method(args.method, args.seed, round_ + plan_round_offset)
    start = decode_start(tensors, meta, plan.filler(spec.rank, task.module_shapes(), down=True))
    # the client's own factors (FedSA-LoRA's B), kept on this node
    store = client_store(args, context, plan, str(meta.get("state-id", "")))
    return ClientMessage(args, task, spec, round_, plan, start, store, meta)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this client's LoRA from the server's start adapter; reply with its update."""
    m = open_message(msg, context)  # what this method's clients train and send in this round
    m.task.set_base(m.start.base_delta, {})  # merge protocol: W0 + every merged round
    client = m.spec.client_id
    result = train_client(
        m.task,
        m.spec,
        m.start,
        seed=int(m.meta["seed"]),
        round_=m.round_,
        private=m.args.private,
        plan=m.plan,
        local=m.store.load(client, m.round_) if m.store else None,
    )
    if m.store:
        m.store.save(client, m.round_, result.factors)
    update_tensors, update_meta = encode_update(client_update(m.spec, result, m.plan), m.plan.sends)
    reply = {**update_meta, "metrics": clean_metrics(result.metrics)[0]}
    return Message(to_content(update_tensors, reply), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """``--eval_personalized``: score the model this node's client holds after the round (the
    server's start of its next round, on the global base and dense extras) on the client's own
    held-out split, with the in-process engine's function; reply with the figures alone
    (``null`` when the client holds nothing out)."""
    m = open_message(msg, context, plan_round_offset=1)  # the next start's protocol
    m.task.set_base(m.start.base_delta, m.start.dense)  # the global model's base and extras
    client = m.spec.client_id
    kept = m.store.load(client, m.round_ + 1) if m.store else None  # as it trained it last
    figures = score_client(m.task, m.spec, m.start, m.plan, round_=m.round_, local=kept)
    reply = {"figures": json.dumps(figures), "client": client, "round": m.round_}
    return Message(to_content({}, reply), reply_to=msg)
