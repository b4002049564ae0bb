"""A hostile Flower ClientApp for tests: rblora's own ClientApp, except on a node whose node
config says ``hostile="<kind>"``, where the reply is crafted as :data:`TAMPERS` says (or the
discovery answer is malformed). Used in-process by the test Grid and, copied into a Flower App
folder, by a real SuperNode on loopback. Only a test file: nothing in rblora knows of it."""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
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


def _huge_metric(arrays, config):  # an integer no float can hold: refused, never converted
    return arrays, {**config, "metrics": json.dumps({"loss": 10**400})}


def _nested_metrics(arrays, config):  # deeper than Python's parser can recurse
    return arrays, {**config, "metrics": "[" * 100_000 + "]" * 100_000}


def _string_array(arrays, config):  # not a number at all: refused before any conversion
    key = sorted(k for k in arrays if k.endswith("/A"))[0]
    return {**arrays, key: np.full(tuple(arrays[key].shape), "x")}, config


def _float16(arrays, config):
    return {k: v.half() for k, v in arrays.items()}, config


def _lying_header(arrays, config):  # metadata says float32 (8, 16); the .npy holds float64
    key = sorted(k for k in arrays if k.endswith("/A"))[0]
    return {**arrays, key: LyingArray(arrays[key])}, config


class LyingArray:
    """Stands for a tensor whose Flower Array declares float32 of its shape while its bytes
    are a float64 ``.npy`` of half as many rows (the same byte count)."""

    def __init__(self, tensor):
        self.tensor = tensor


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
    "huge-metric": _huge_metric,
    "nested-metrics": _nested_metrics,
    "string-array": _string_array,
    "float16": _float16,
    "lying-header": _lying_header,
}

app = ClientApp()


def _array(value) -> Array:
    if isinstance(value, LyingArray):
        t = value.tensor
        half = np.zeros((t.shape[0] // 2, *t.shape[1:]), dtype=np.float64)
        honest_array = Array(half)
        return Array(dtype="float32", shape=tuple(t.shape), stype=honest_array.stype,
                     data=honest_array.data)  # fmt: skip
    return Array(value if isinstance(value, np.ndarray) else value.numpy())


@app.query()
def query(msg: Message, context: Context) -> Message:
    kind = context.node_config.get("hostile")
    if kind == "malformed-answer":
        answer = ConfigRecord({"partition-ids": "one", "lora-rank": -1})
        return Message(RecordDict({CONFIG: answer}), reply_to=msg)
    reply = honest.query(msg, context)
    if kind in ("claim", "huge-size"):  # another node's partition, or a weight of 10**18
        answer = dict(reply.content.config_records[CONFIG])
        if kind == "claim":
            answer["partition-ids"] = [int(context.node_config["claim"])]
        else:
            answer["num-examples"] = [10**18]
        return Message(RecordDict({CONFIG: ConfigRecord(answer)}), reply_to=msg)
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    kind = context.node_config.get("hostile")
    if kind not in TAMPERS:
        return reply
    arrays = dict(reply.content.array_records[ARRAYS].to_torch_state_dict())
    config = dict(reply.content.config_records[CONFIG])
    arrays, config = TAMPERS[kind](arrays, config)
    record = ArrayRecord({k: _array(v) for k, v in arrays.items()})
    content = RecordDict({ARRAYS: record, CONFIG: ConfigRecord(config)})
    return Message(content, reply_to=msg)
