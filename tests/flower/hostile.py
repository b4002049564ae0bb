"""A hostile Flower ClientApp for tests: rblora's own ClientApp, except on a node whose node
config says ``hostile="<kind>"``, where the reply is crafted as :data:`TAMPERS` says (or the
discovery answer is malformed). Used in-process by the test Grid and, copied into a Flower App
folder, by a real SuperNode on loopback. Only a test file: nothing in rblora knows of it."""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from rblora.flower import client_app as honest

ARRAYS, CONFIG = "arrays", "config"


def _scale(arrays, config):  # claims a huge lora_alpha with rsLoRA: 6e5 times the weight
    return arrays, {**config, "lora-alpha": 1.6e7, "use-rslora": True}


def _examples(arrays, config):
    return arrays, {**config, "num-examples": 10**9}


def _identity_metrics(arrays, config):  # metrics that try to rewrite the record's identity
    metrics = {"type": "round", "round": 99, "client": 2, "num_examples": 1e9, "rank": 1,
               "loss": "low", "seconds": float("nan"), "steps": 3, "note": "hi"}  # fmt: skip
    return arrays, {**config, "metrics": json.dumps(metrics)}


def _head_only(arrays, config):  # a LoRA client sending no factors
    return {k: v for k, v in arrays.items() if "/lora/" not in k}, config


def _missing_array(arrays, config):
    drop = sorted(k for k in arrays if k.endswith("/B"))[0]
    return {k: v for k, v in arrays.items() if k != drop}, config


def _float64(arrays, config):
    return {k: v.double() for k, v in arrays.items()}, config


def _extra_array(arrays, config):
    first = sorted(arrays)[0]
    return {**arrays, "update/lora/not.a.module/A": arrays[first].clone()}, config


_OTHER_RANK = {2: 4, 4: 8, 8: 2}  # the tests' clients have ranks 2, 4 and 8


def _other_rank(arrays, config):  # shaped like another client's update (zeros: harmless)
    out = {}
    for key, value in arrays.items():
        if key.endswith("/A"):
            out[key] = torch.zeros(_OTHER_RANK[value.shape[0]], value.shape[1])
        elif key.endswith("/B"):
            out[key] = torch.zeros(value.shape[0], _OTHER_RANK[value.shape[1]])
        else:
            out[key] = value
    return out, config


def _nan(arrays, config):
    key = sorted(k for k in arrays if k.endswith("/A"))[0]
    return {**arrays, key: torch.full_like(arrays[key], float("nan"))}, config


def _unknown_meta(arrays, config):
    return arrays, {**config, "server-please": "trust me"}


TAMPERS = {
    "scale": _scale,
    "examples": _examples,
    "identity-metrics": _identity_metrics,
    "head-only": _head_only,
    "missing-array": _missing_array,
    "float64": _float64,
    "extra-array": _extra_array,
    "other-rank": _other_rank,
    "nan": _nan,
    "unknown-meta": _unknown_meta,
}

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    kind = context.node_config.get("hostile")
    if kind == "malformed-answer":
        answer = ConfigRecord({"partition-id": "one", "lora-rank": -1})
        return Message(RecordDict({CONFIG: answer}), reply_to=msg)
    return honest.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    kind = context.node_config.get("hostile")
    if kind not in TAMPERS:
        return reply
    arrays = dict(reply.content.array_records[ARRAYS].to_torch_state_dict())
    config = dict(reply.content.config_records[CONFIG])
    arrays, config = TAMPERS[kind](arrays, config)
    content = RecordDict({ARRAYS: ArrayRecord(arrays), CONFIG: ConfigRecord(config)})
    return Message(content, reply_to=msg)
