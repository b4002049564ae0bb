"""rblora's Flower ClientApp: one client's data and local training, with the same task code as
the in-process engine.

A node says which client it is in its node config::

    flower-supernode ... --node-config 'partition-id=3 lora-rank=64 data-path="/data/prepared"'

``partition-id`` (required): the client's index in the prepared data folder; ``lora-rank``
(optional): its LoRA rank (else the run's ``client_ranks``); ``data-path`` (optional): the
prepared folder on this machine (else the run's ``data_path``); ``device`` (optional): where this
node trains (``auto``, ``cpu``, ``cuda``, ...; default ``auto``: this machine's GPU if it has one,
whatever device the server uses). Only the client's own file
``<data-path>/<K>/local_training_<partition-id>.json`` is read (for images, its index file and the
embedded image set it names); the node needs no other client's file and no test set.

Messages: ``query`` (who are you: partition, rank, examples) and ``train`` (start adapter in,
update out). The run's options travel in every message, so the node needs nothing but its node
config. The task is built once per process and reused (a simulation worker serves many rounds;
a deployed SuperNode starts a fresh process per message and rebuilds it).
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from rblora.federation.options import TrainArgs
from rblora.federation.rounds import client_update, train_client
from rblora.flower.records import CONFIG, from_content, to_content
from rblora.protocol.codec import decode_start, encode_update
from rblora.protocol.types import ClientSpec, clean_metrics

app = ClientApp()

_TASKS: dict[str, Any] = {}
"""Built client tasks of this process, by (options, client): each holds its client's data."""
_MODELS: dict = {}
"""Loaded base models of this process, shared by its client tasks (loading is the slow part)."""


def node_identity(context: Context) -> tuple[int, int | None, str | None]:
    """(partition-id, lora-rank or None, data-path or None) from the node config."""
    config = context.node_config
    if "partition-id" not in config:
        raise ValueError(
            f"node config {dict(config)} has no partition-id; start the SuperNode with "
            "--node-config 'partition-id=K lora-rank=R'"
        )
    rank = config.get("lora-rank")
    path = config.get("data-path")
    return int(config["partition-id"]), (None if rank is None else int(rank)), path


def client_args(options: dict, context: Context) -> TrainArgs:
    """The run's options as this node uses them: its own data folder and its own device (the
    server's ``--device`` is where the server evaluates); precision as the run recorded it."""
    _, _, path = node_identity(context)
    local = {"device": str(context.node_config.get("device", "auto"))}
    if path:
        local["data_path"] = str(path)
    return TrainArgs(**{**options, **local})


def client_task(args: TrainArgs, client: int):
    """The task of ``client`` under ``args`` (its own data, no evaluation sets), built once per
    process."""
    from transformers.utils import logging as hf_logging

    from rblora.tasks import build_task

    key = json.dumps([args.to_dict(), client], sort_keys=True)
    if key not in _TASKS:
        hf_logging.disable_progress_bar()  # this process is a ClientApp: no bars in its log
        _TASKS[key] = build_task(
            args, log=lambda _: None, clients=[client], evaluation=False, models=_MODELS
        )
    return _TASKS[key]


def _options(msg: Message) -> dict:
    return json.loads(msg.content.config_records[CONFIG]["train-args"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is: its partition, rank (-1: the run's) and training examples."""
    client, rank, _ = node_identity(context)
    args = client_args(_options(msg), context)
    task = client_task(args, client)
    answer = {"partition-id": client, "lora-rank": -1 if rank is None else rank,
              "num-examples": task.num_examples(client)}  # fmt: skip
    return Message(RecordDict({CONFIG: ConfigRecord(answer)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this client's LoRA from the server's start adapter; reply with its update."""
    tensors, meta = from_content(msg.content)
    client, _, _ = node_identity(context)
    if int(meta["client"]) != client:
        raise ValueError(f"message for client {meta['client']} reached partition {client}")
    args = client_args(json.loads(meta["train-args"]), context)
    task = client_task(args, client)
    start = decode_start(tensors, meta)
    task.set_base(start.base_delta, {})  # merge protocol: W0 + every merged round
    spec = ClientSpec(client, int(meta["rank"]), args.lora_alpha, args.use_rslora)
    result = train_client(
        task,
        spec,
        start,
        seed=int(meta["seed"]),
        round_=int(meta["round"]),
        private=args.private,
    )
    update_tensors, update_meta = encode_update(client_update(spec, result))
    reply = {**update_meta, "metrics": clean_metrics(result.metrics)[0]}
    return Message(to_content(update_tensors, reply), reply_to=msg)
