"""The steps of one federated round, each one function that every driver calls.

A driver (the in-process loop, the Flower server) does, for round ``t``::

    selected = server.select(t)
    tally = RoundTally()
    for each selected client k (here or on its own machine), as its reply arrives:
        start = server.deliver(k)                      # what k starts from, bytes it downloads
        result = train_client(task, spec, start, ...)  # local training (the task's)
        update = client_update(spec, result)           # what travels to the server
        server.fold(update)                            # into the round's running sums
        record = client_record(t, spec, result, start)
        keep_client_record(folder, record, tally)      # metrics.jsonl (or private/), the sums
    round_record = close_round(task, server, folder, t, tally, started=...)
    commit_round(server, folder, round_record, trackers)  # metrics line, checkpoint, trackers

``close_round`` aggregates, redistributes, writes the global model's PEFT folder, installs the
global model in the task's base weights, evaluates it and returns the round's metrics record
(for a method without a global model, FedSA-LoRA: the shared factors with a note, and no global
figure). With ``--eval_personalized`` the driver then scores each client's own model
(:mod:`rblora.federation.personal`: in process, or each Flower node its own client). The
drivers keep only iteration, transport, progress and the checkpoint.

Under client-level DP (``folder.private``) only what may be released reaches ``metrics.jsonl``,
and from it results, tables and trackers: the :data:`RELEASED` fields of each round line (the
evaluation of the noised model, epsilon, the adaptive clip). Client lines, the selection and
everything else computed from raw client updates (losses, bytes, timings, clipping counts and
norms) go to ``private/metrics.jsonl``; client adapters to ``private/round_<t>/``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rblora.aggregation import ClientUpdate
from rblora.aggregation.running import ModuleDelta, orthonormal_form
from rblora.aggregation.types import Factors
from rblora.federation.rundir import RunFolder
from rblora.federation.server import FederatedServer, GlobalModel
from rblora.federation.tracking import Trackers
from rblora.protocol.factors import DEFAULT_PLAN, FactorPlan
from rblora.protocol.types import (
    ClientResult,
    ClientSpec,
    ClientStart,
    clean_metrics,
    tensor_bytes,
)
from rblora.tasks.base import Task
from rblora.training import TrainingDiverged

RELEASED = ("type", "round", "method", "reduction", "eval", "eval_seconds", "dp_epsilon", "dp_clip",
            "threshold_rank")  # fmt: skip
"""The fields of a round line a DP run releases: the round, the public configuration, the
evaluation of the released (noised) model, what is read off it alone (``threshold_rank``) and
what the accountant and adaptive clipping release. Everything else of the line is computed from
raw client updates or reveals who took part."""


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
    plan: FactorPlan = DEFAULT_PLAN,
    local: dict | None = None,
) -> ClientResult:
    """The task's local training of one client; divergence stops the run naming the client.
    ``private``: the run has client-level DP, so after round 1 the start carries the noise.
    ``plan``: the method's client protocol: the start's frozen factors are set to the run's
    initialisation, a local factor to the client's own (``local``: what the client kept from
    the round it last trained, None: nothing yet) and only the factors it trains are trained
    (both engines call this)."""
    if not plan.is_default:  # the layout's modules: none when no LoRA is trained (head only)
        start = plan.client_start(spec, start, task.update_layout().modules, local)
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


def client_update(
    spec: ClientSpec, result: ClientResult, plan: FactorPlan = DEFAULT_PLAN
) -> ClientUpdate:
    """What a client sends to the server: its factors, dense extras, example count and scaling
    (the example count is the spec's when the spec knows it: the server's word, not the task's).
    Its rank is the spec's, or smaller where the method's clients prune their rank (``plan``)."""
    for module, (a, _) in result.factors.items():
        try:
            plan.check_rank(int(a.shape[0]), spec.rank, f"client {spec.client_id}")
        except ValueError as err:
            raise RunError(f"{err} (module {module})") from None
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


def upload_bytes(update: ClientUpdate, plan: FactorPlan = DEFAULT_PLAN) -> int:
    """Bytes of a client's update as stored: the factors its method's protocol sends, and the
    dense extras."""
    return tensor_bytes(plan.travels(update.factors) + list(update.dense.values()))


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


@dataclass
class RoundTally:
    """What a round's client lines add up to, kept as sums (never the lines themselves)."""

    clients: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    loss_sum: float = 0.0  # sum of loss * examples over the clients that reported a loss
    loss_examples: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.clients += 1
        self.bytes_up += record["bytes_up"]
        self.bytes_down += record["bytes_down"]
        if record.get("loss") is not None:
            self.loss_sum += record["loss"] * record["num_examples"]
            self.loss_examples += record["num_examples"]

    @property
    def train_loss(self) -> float | None:
        """The example-weighted mean of the clients' losses (None if none reported one)."""
        return self.loss_sum / self.loss_examples if self.loss_examples else None


def keep_client_record(
    folder: RunFolder, record: dict[str, Any], tally: RoundTally, write: bool = True
) -> None:
    """Add a client's line to the round's ``tally`` and, with ``write`` (``--record_clients``),
    append it to ``metrics.jsonl``, or under DP to the private records only, and log it."""
    tally.add(record)
    if not write:
        return
    if folder.private:
        folder.append_private(record)
    else:
        folder.append_metrics(record)
    log(client_line(record))


def save_client_adapter(
    task: Task, folder: RunFolder, round_: int, spec: ClientSpec, update: ClientUpdate
) -> None:
    """``round_<t>/client_<k>`` (``private/round_<t>/client_<k>`` under DP): the client's
    trained adapter at its own rank and alpha."""
    ranks = {update.rank(m) for m in update.factors}
    task.save_adapter(
        folder.client_dir(round_, spec.client_id),
        dict(update.factors),
        dict(update.dense),
        rank=ranks.pop() if len(ranks) == 1 else spec.rank,  # a pruned client's, else its own
        lora_alpha=spec.lora_alpha,
        use_rslora=spec.use_rslora,
    )


# ---------------------------------------------------------------------- the server's part
def close_round(
    task: Task,
    server: FederatedServer,
    folder: RunFolder,
    round_: int,
    tally: RoundTally,
    *,
    started: float,
    selected: list[int],
    missing: dict[int, str] | None = None,
    export: bool = True,
) -> dict[str, Any]:
    """Aggregate what the server folded in (:meth:`FederatedServer.fold`), redistribute,
    export, install and evaluate the global model of ``round_``.

    ``tally``: the sums of the round's client lines; ``missing``: selected clients whose update
    did not arrive, with the reason (recorded). ``export``: write ``round_<t>/global`` (False in
    a round ``--save_every`` skips). Returns the round's metrics record (the driver writes it,
    then the checkpoint).
    """
    agg_start = time.perf_counter()
    global_update = server.aggregate()
    model = server.redistribute(global_update)
    shared_only = not server.plan.has_global_model  # the clients keep a factor: no global model
    # the model evaluated is the one handed out, to the bit (a bf16 body rounds each layer's
    # output: factors equal to rounding are not enough)
    if export and not shared_only:
        model = handed_out(model)
    agg_seconds = time.perf_counter() - agg_start
    if export:
        (export_shared if shared_only else export_global)(task, folder.global_dir(round_), model)
    eval_start = time.perf_counter()
    if shared_only:
        evaluation: dict[str, Any] = {"global": NO_GLOBAL_MODEL}
    else:
        evaluation = keep_item_outcomes(folder, round_, evaluate_global(task, model, round_))
    install_global(task, server)  # the next round trains on what a resumed run installs
    eval_seconds = time.perf_counter() - eval_start
    record: dict[str, Any] = {
        "type": "round",
        "round": round_,
        "selected": selected,
        "method": global_update.method,
        "reduction": global_update.reduction,
        "clients": tally.clients,
        "train_loss": tally.train_loss,
        "bytes_up": tally.bytes_up,
        "bytes_down": tally.bytes_down,
        "aggregate_seconds": round(agg_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "round_seconds": round(time.perf_counter() - started, 3),
        "eval": evaluation,
    }
    if global_update.kept:
        record["threshold_rank"] = threshold_rank(global_update.kept)
    released, private = server.privacy_record()
    record.update({**released, **private})
    if missing:
        record["missing"] = {str(k): reason for k, reason in sorted(missing.items())}
    return record


def threshold_rank(kept: dict[str, int]) -> dict[str, Any]:
    """The ``threshold`` (FLoRIST) ranks of a round: each module's kept rank (the most
    components a client started from), their sum (FLoRIST's "total rank"), least and most."""
    ranks = list(kept.values())
    return {"total": sum(ranks), "min": min(ranks), "max": max(ranks), "modules": dict(kept)}


def keep_personal(record: dict[str, Any], figures: dict[str, Any], private: bool) -> None:
    """Put a round's personalised figures (``--eval_personalized``) in its ``record``: beside
    the global figures (``eval.personalized``), or in a DP run (``private``) under
    ``personalized``, which only the private records keep: they are statistics of the clients'
    own held-out data, which a DP run does not release."""
    if private:
        record["personalized"] = figures
    else:
        record["eval"]["personalized"] = figures


def split_record(record: dict[str, Any], private: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(released, kept private)`` of a round line: everything is released without DP; under DP
    only the :data:`RELEASED` fields, the rest (with the round) goes to the private records."""
    if not private:
        return record, {}
    released = {k: v for k, v in record.items() if k in RELEASED}
    kept = {k: v for k, v in record.items() if k not in RELEASED or k in ("type", "round")}
    return released, kept


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
    """Write the round's metrics line (under DP: its private fields first, to the private
    records, then the released ones), then the checkpoint, then send the round (its client lines
    and this one, as metrics.jsonl holds them) to the ``trackers``. In that order: a kill
    between the first two leaves the checkpoint of the round before, and resuming drops the
    lines and redoes the round; a tracker gets only rounds a resumed run keeps."""
    released, kept = split_record(record, folder.private)
    if kept:
        folder.append_private(kept)
    folder.append_metrics(released)
    tensors, meta = server.state_tensors()
    folder.save_checkpoint(tensors, {**meta, "round_record": record})
    log(round_line(released))
    report(folder, trackers)


def report(folder: RunFolder, trackers: Trackers | None) -> None:
    """Send the trackers (``--report_to``) the committed rounds of the metrics they lack."""
    if trackers:
        trackers.sync(folder.read_metrics())


# ---------------------------------------------------------------------- export
def handed_out(model: GlobalModel) -> GlobalModel:
    """``model`` with each module's delta in the form it is handed out in (:func:`exact_factors`):
    the same update to float32 rounding."""
    return GlobalModel(exact_factors(model.delta), model.merged, model.dense)


def export_global(task: Task, path: Path, model: GlobalModel) -> None:
    """``round_<t>/global``: a PEFT folder that gives exactly the global model when loaded on the
    ORIGINAL base model (for the merge protocol: every merged round, not only the last), with
    scale 1 on every module (``lora_alpha == r``, ``alpha_pattern == rank_pattern``), and the
    averaged dense extras as modules_to_save. ``model``: in its :func:`handed_out` form (each
    module orthonormal at its own rank), written as it is."""
    from rblora.adapters.peft_io import common_rank  # peft is imported when first needed

    factors = model.delta  # {}: dense extras only
    rank = common_rank(factors) if factors else 0
    task.save_adapter(
        path, factors, model.dense, rank=rank, lora_alpha=float(max(rank, 1)), use_rslora=False
    )


NO_GLOBAL_MODEL = (
    "not defined: the method's clients keep a factor of their own (FedSA-LoRA's B), so no "
    "model is global; see the personalized figures"
)
"""What a round line's ``eval.global`` says for a method without a global model."""

SHARED_NOTE = """# The shared factors of a round, not a model

This run's method keeps a LoRA factor on each client (FedSA-LoRA: every client trains A and B,
sends A alone and keeps its own B). The server never sees a B, so no global model exists:
each client's model is this A (its first r rows) with the client's own B.

This folder holds the server's aggregate as it is: `lora_A` is the shared A (its rows averaged
per component over the clients that hold them), `lora_B` is zero, scale 1 (`lora_alpha` equal
to the rank), and the averaged dense extras (a classification head) as modules_to_save. Loaded
with PEFT it gives the base model (plus the head): evaluate clients' models with
`--eval_personalized`, or load a client's adapter from `round_<t>/client_<k>/`.
"""


def export_shared(task: Task, path: Path, model: GlobalModel) -> None:
    """``round_<t>/global`` for a method without a global model: the shared factors as they
    are (A averaged, B zero, each module at the widest rank, scale 1), the averaged dense
    extras, and ``NOTE.md`` saying what the folder is (:data:`SHARED_NOTE`)."""
    from rblora.adapters.peft_io import common_rank
    from rblora.utils.atomic import write_text

    factors = {m: (d[0].float(), d[1].float()) for m, d in model.delta.items()}
    rank = common_rank(factors) if factors else 0
    task.save_adapter(
        path, factors, model.dense, rank=rank, lora_alpha=float(max(rank, 1)), use_rslora=False
    )
    write_text(path / "NOTE.md", SHARED_NOTE)


def exact_factors(delta: dict[str, ModuleDelta]) -> Factors:
    """The same update as float32 LoRA factors ``(A: (k, d_in), B: (d_out, k))``, A with
    orthonormal rows, each module at its own rank ``k`` (saved through PEFT's ``rank_pattern``):
    :func:`rblora.aggregation.running.orthonormal_form` of each module, the SVD form of a
    factored update (never a stack of client blocks), exact to float32 rounding."""
    return {module: orthonormal_form(value) for module, value in delta.items()}


# ---------------------------------------------------------------------- records and lines
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

    took = f" in {r['round_seconds']:.0f}s" if "round_seconds" in r else ""
    if r["round"] == 0:
        parts = [f"base model evaluated{took}"]
    else:
        parts = [f"round {r['round']} done{took}"]
    if r.get("train_loss") is not None:
        parts.append(f"train loss {r['train_loss']:.4f}")
    for name, value in scalar_evals(r.get("eval")).items():
        if name.endswith(("/accuracy", "/loss")):
            parts.append(f"{name} {value:.4f}")
    personal = (r.get("eval") or {}).get("personalized")
    if personal:
        parts.append(personal_text(personal))
    if r.get("threshold_rank"):
        kept = r["threshold_rank"]
        parts.append(f"threshold rank {kept['min']}-{kept['max']} (total {kept['total']})")
    if r.get("dp_epsilon") is not None:
        parts.append(f"DP epsilon {r['dp_epsilon']:.3g}")
    if r.get("dp_clip") is not None:
        parts.append(f"DP clip {r['dp_clip']:.3g}")
    if r.get("missing"):
        parts.append(f"missing clients {', '.join(r['missing'])}")
    return ", ".join(parts)


def personal_text(p: dict[str, Any]) -> str:
    """``personalized accuracy 0.6100 sd 0.0500, loss ... over 4 clients`` (the round line)."""
    figures = [
        f"{name} {p[name + '_mean']:.4f} sd {p[name + '_sd']:.4f}"
        for name in ("accuracy", "loss")
        if p.get(name + "_mean") is not None
    ]
    return f"personalized {', '.join(figures) or 'none'} over {p.get('clients', 0)} clients"
