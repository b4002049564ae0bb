"""The steps of one federated round, each one function that every driver calls.

A driver (the in-process loop, the Flower server) does, for round ``t``::

    selected = server.select(t)
    for each selected client k (here or on its own machine):
        start = server.deliver(k)                      # what k starts from, bytes it downloads
        result = train_client(task, spec, start, ...)  # local training (the task's)
        update = client_update(spec, result)           # what travels to the server
        record = client_record(t, spec, result, start)
    round_record = close_round(task, server, folder, t, updates, records, started=...)
    commit_round(server, folder, round_record, trackers)  # metrics line, checkpoint, trackers

``close_round`` aggregates, redistributes, writes the global model's PEFT folder, installs the
global model in the task's base weights, evaluates it and returns the round's metrics record. The
drivers keep only iteration, transport, progress and the checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from rblora.aggregation import ClientUpdate
from rblora.aggregation.running import ModuleDelta, delta_shape, is_dense
from rblora.aggregation.types import Factors
from rblora.federation.rundir import RunFolder
from rblora.federation.server import FederatedServer, GlobalModel
from rblora.federation.tracking import Trackers
from rblora.protocol.types import (
    ClientResult,
    ClientSpec,
    ClientStart,
    clean_metrics,
    tensor_bytes,
)
from rblora.tasks.base import Task
from rblora.training import TrainingDiverged


class RunError(RuntimeError):
    """The run cannot go on (e.g. a client's training diverged); the message says who and when."""


def log(message: str) -> None:
    """One concise line on stderr (progress bars share it)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------- a client
def train_client(
    task: Task,
    spec: ClientSpec,
    start: ClientStart,
    *,
    seed: int,
    round_: int,
    private: bool = False,
) -> ClientResult:
    """The task's local training of one client; divergence stops the run naming the client.
    ``private``: the run has client-level DP, so after round 1 the start carries the noise."""
    try:
        return task.train_client(spec, start, seed=seed, round_=round_)
    except TrainingDiverged as err:
        advice = "lower --local_learning_rate and start again"
        if private and round_ > 1:
            advice = (
                "the start carried the DP noise of the last global model: give a smaller "
                "--dp_clip, a larger --dp_epsilon (or smaller --dp_noise_multiplier) or more "
                "clients per round, or lower --local_learning_rate"
            )
        raise RunError(
            f"client {spec.client_id} (rank {spec.rank}) in round {round_}: training {err}; "
            f"nothing of this round was aggregated ({advice})"
        ) from None


def client_update(spec: ClientSpec, result: ClientResult) -> ClientUpdate:
    """What a client sends to the server: its factors, dense extras, example count and scaling
    (the example count is the spec's when the spec knows it: the server's word, not the task's)."""
    if spec.num_examples is not None and result.num_examples != spec.num_examples:
        raise RunError(
            f"client {spec.client_id} trained on {result.num_examples} examples but the run "
            f"expects {spec.num_examples} (its data changed since the run started)"
        )
    return ClientUpdate(
        num_examples=result.num_examples,
        lora_alpha=spec.lora_alpha,
        factors=result.factors,
        use_rslora=spec.use_rslora,
        client_id=spec.client_id,
        dense=result.dense,
    )


def upload_bytes(update: ClientUpdate) -> int:
    """Bytes of a client's update as stored (factors and dense extras)."""
    pairs = update.factors.values()
    return tensor_bytes([t for pair in pairs for t in pair] + list(update.dense.values()))


def client_record(
    round_: int, spec: ClientSpec, result: ClientResult, start: ClientStart, bytes_up: int
) -> dict[str, Any]:
    """The client's line in metrics.jsonl: its identity and weight from the server's own
    knowledge (``spec``, the round), written over anything the client's metrics say; of the
    metrics only finite numbers under known names are kept (``clean_metrics``)."""
    metrics, dropped = clean_metrics(result.metrics)
    if dropped:
        log(f"round {round_} client {spec.client_id}: metrics dropped: {', '.join(dropped)}")
    identity = {
        "type": "client",
        "round": round_,
        "client": spec.client_id,
        "rank": spec.rank,
        "num_examples": spec.num_examples if spec.num_examples is not None else result.num_examples,
    }
    counts = {"bytes_down": start.download_bytes, "bytes_up": bytes_up}
    return {**identity, **metrics, **counts, **identity}


def save_client_adapter(
    task: Task, folder: RunFolder, round_: int, spec: ClientSpec, update: ClientUpdate
) -> None:
    """``round_<t>/client_<k>``: the client's trained adapter at its own rank and alpha."""
    task.save_adapter(
        folder.client_dir(round_, spec.client_id),
        dict(update.factors),
        dict(update.dense),
        rank=spec.rank,
        lora_alpha=spec.lora_alpha,
        use_rslora=spec.use_rslora,
    )


# ---------------------------------------------------------------------- the server's part
def close_round(
    task: Task,
    server: FederatedServer,
    folder: RunFolder,
    round_: int,
    updates: list[ClientUpdate],
    client_records: list[dict[str, Any]],
    *,
    started: float,
    selected: list[int],
    missing: dict[int, str] | None = None,
    export: bool = True,
) -> dict[str, Any]:
    """Aggregate, redistribute, export, install and evaluate the global model of ``round_``.

    ``missing``: selected clients whose update did not arrive, with the reason (recorded).
    ``export``: write ``round_<t>/global`` (False in a round ``--save_every`` skips).
    Returns the round's metrics record (the driver writes it, then the checkpoint).
    """
    agg_start = time.perf_counter()
    global_update = server.aggregate(updates)
    model = server.redistribute(global_update)
    agg_seconds = time.perf_counter() - agg_start
    if export:
        export_global(task, folder.global_dir(round_), model)
    eval_start = time.perf_counter()
    evaluation = keep_item_outcomes(folder, round_, evaluate_global(task, model, round_))
    eval_seconds = time.perf_counter() - eval_start
    record: dict[str, Any] = {
        "type": "round",
        "round": round_,
        "selected": selected,
        "method": global_update.method,
        "reduction": global_update.reduction,
        "train_loss": weighted_loss(client_records),
        "bytes_up": sum(r["bytes_up"] for r in client_records),
        "bytes_down": sum(r["bytes_down"] for r in client_records),
        "aggregate_seconds": round(agg_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "round_seconds": round(time.perf_counter() - started, 3),
        "eval": evaluation,
        **server.privacy_record(),
    }
    if missing:
        record["missing"] = {str(k): reason for k, reason in sorted(missing.items())}
    return record


def install_global(task: Task, server: FederatedServer) -> None:
    """Put the server's current global state into the task's base (merged total, dense extras):
    after every round, and when a run is resumed."""
    task.set_base(server.base_total.as_dict(), server.dense)


def evaluate_global(task: Task, model: GlobalModel, round_: int) -> dict[str, Any]:
    """Install ``model`` in the task and evaluate it: a merged delta lives in the base weights,
    any other delta is applied on top of the unchanged base for the evaluation only."""
    task.set_base(model.delta if model.merged else {}, model.dense)
    return task.evaluate({} if model.merged else model.delta, round_=round_)


def keep_item_outcomes(
    folder: RunFolder, round_: int, evaluation: dict[str, Any]
) -> dict[str, Any]:
    """Write the per-item outcomes of an evaluation (its ``"items"``) to
    ``evaluation/round_<t>.json`` and return the evaluation without them (the metrics line keeps
    the figures only). Called before the round's metrics line is written, so a line never
    exists without its file; a round redone after a resume writes its file again."""
    evaluation = dict(evaluation)
    items = evaluation.pop("items", None)
    if items:
        folder.write_items(round_, items)
    return evaluation


def evaluate_base_once(
    task: Task, folder: RunFolder, trackers: Trackers | None = None
) -> list[dict[str, Any]]:
    """Round 0: the untouched base model, as a baseline for the per-round figures; written to
    the metrics unless they already hold it (a resumed run), then to the ``trackers``. Returns
    the new records."""
    if any(r.get("type") == "round" and r.get("round") == 0 for r in folder.read_metrics()):
        return []
    start = time.perf_counter()
    evaluation = keep_item_outcomes(folder, 0, task.evaluate({}, round_=0))
    record = {"type": "round", "round": 0, "selected": [], "eval": evaluation}
    record["eval_seconds"] = record["round_seconds"] = round(time.perf_counter() - start, 3)
    folder.append_metrics(record)
    log(round_line(record))
    report(folder, trackers)
    return [record]


def commit_round(
    server: FederatedServer,
    folder: RunFolder,
    record: dict[str, Any],
    trackers: Trackers | None = None,
) -> None:
    """Write the round's metrics line, then the checkpoint, then send the round (its client
    lines and this one) to the ``trackers``. In that order: a kill between the first two leaves
    the checkpoint of the round before, and resuming drops the line and redoes the round; a
    tracker gets only rounds a resumed run keeps."""
    folder.append_metrics(record)
    tensors, meta = server.state_tensors()
    folder.save_checkpoint(tensors, {**meta, "round_record": record})
    log(round_line(record))
    report(folder, trackers)


def report(folder: RunFolder, trackers: Trackers | None) -> None:
    """Send the trackers (``--report_to``) the committed rounds of the metrics they lack."""
    if trackers:
        trackers.sync(folder.read_metrics())


# ---------------------------------------------------------------------- export
def export_global(task: Task, path: Path, model: GlobalModel) -> None:
    """``round_<t>/global``: a PEFT folder that gives exactly the global model when loaded on the
    ORIGINAL base model (for the merge protocol: every merged round, not only the last), with
    scale 1 on every module (``lora_alpha == r``, ``alpha_pattern == rank_pattern``), each module
    at its own rank (:func:`exact_factors`), and the averaged dense extras as modules_to_save."""
    from rblora.adapters.peft_io import common_rank  # peft is imported when first needed

    factors = exact_factors(model.delta) if model.delta else {}  # {}: dense extras only
    rank = common_rank(factors) if factors else 0
    task.save_adapter(
        path, factors, model.dense, rank=rank, lora_alpha=float(max(rank, 1)), use_rslora=False
    )


def exact_factors(delta: dict[str, ModuleDelta]) -> Factors:
    """The same update as float32 LoRA factors ``(A: (k, d_in), B: (d_out, k))``, each module at
    its own rank ``k <= min(d_out, d_in)`` (saved through PEFT's ``rank_pattern``).

    A factored delta of width ``k <= min(d_out, d_in)`` is kept as it is: the merge protocol's
    running total is already in SVD form at its numerical rank, and a global update's stack is
    smaller than any other exact LoRA form of it. A dense delta (or a stack wider than the
    matrix) is written as an identity on its smaller side and the dense matrix on the other:
    ``(I, dW)`` when ``d_in <= d_out``, else ``(dW, I)``, ``d_out * d_in + min(d_out, d_in)^2``
    values, the fewest of any LoRA pair of full rank, and bit for bit the dense values. A dense
    total of lower numerical rank would be smaller as SVD factors, but the running total goes
    dense only once its rank makes factors as large as the matrix, and an SVD of every dense
    module every round would cost about two minutes per 4096 x 4096 module on 2 CPU cores
    (docs/privacy.md).
    """
    out: Factors = {}
    for module, value in delta.items():
        d_out, d_in = delta_shape(value)
        if not is_dense(value) and value[0].shape[0] <= min(d_out, d_in):
            a, b = value
        else:
            dense = value.float() if is_dense(value) else value[1].float() @ value[0].float()
            if d_in <= d_out:
                a, b = torch.eye(d_in, dtype=dense.dtype), dense
            else:
                a, b = dense, torch.eye(d_out, dtype=dense.dtype)
        out[module] = (a.float().contiguous(), b.float().contiguous())
    return out


# ---------------------------------------------------------------------- records and lines
def weighted_loss(client_records: list[dict[str, Any]]) -> float | None:
    pairs = [(r["loss"], r["num_examples"]) for r in client_records if r.get("loss") is not None]
    if not pairs:
        return None
    return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def client_line(r: dict[str, Any]) -> str:
    loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
    return (
        f"round {r['round']} client {r['client']} rank {r['rank']}: loss {loss}, "
        f"{r.get('steps', 0)} steps, {_size(r)}, {r.get('seconds', 0):.1f}s, "
        f"up {fmt_bytes(r['bytes_up'])}, down {fmt_bytes(r['bytes_down'])}"
    )


def _size(r: dict[str, Any]) -> str:
    return f"{r['images']} images" if "images" in r else f"{r.get('tokens', 0)} tokens"


def round_line(r: dict[str, Any]) -> str:
    from rblora.federation.results import scalar_evals

    if r["round"] == 0:
        parts = [f"base model evaluated in {r['round_seconds']:.0f}s"]
    else:
        parts = [f"round {r['round']} done in {r['round_seconds']:.0f}s"]
    if r.get("train_loss") is not None:
        parts.append(f"train loss {r['train_loss']:.4f}")
    for name, value in scalar_evals(r.get("eval")).items():
        if name.endswith(("/accuracy", "/loss")):
            parts.append(f"{name} {value:.4f}")
    if r.get("dp_epsilon") is not None:
        parts.append(f"DP epsilon {r['dp_epsilon']:.3g}")
    if r.get("missing"):
        parts.append(f"missing clients {', '.join(r['missing'])}")
    return ", ".join(parts)
