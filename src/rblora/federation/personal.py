"""Personalised evaluation (``--eval_personalized``): each client's own model, scored on the
held-out split of its own data (``prepare-data --local_test_frac``), reported as the mean,
standard deviation and count over the clients, beside the global model's figures.

A client's personalised model is what it holds after the round: the global update as
redistributed to its own rank (the start of its next round, :meth:`FederatedServer.start_of`;
under heterogeneous ranks and svd, truncate or threshold it differs from client to client),
with any factor the client keeps of its own (FedSA-LoRA's B, from its last training), on
the base weights every client holds (under the merge protocol the merged total), with the
averaged dense extras (a classification head). :func:`score_client` scores it with the task's
own evaluation code (:meth:`rblora.tasks.base.Task.evaluate_local`); both engines call it: the
in-process loop for every scored client (:func:`evaluate_inprocess`), a Flower node for its own
client, whose reply the server checks (:func:`check_figures`) before it counts.

Which clients: every client that has trained at least once (been handed a start,
:meth:`FederatedServer.participants`), after every round (the global evaluation runs every
round); ``--eval_personalized_clients N`` scores a seeded sample of N of them instead. A client
that holds nothing out (too small to spare one example) is not scored; ``clients`` counts the
scored ones. The figures per metric ``m`` (``accuracy``: the task's top-1 or multiple-choice
accuracy; ``loss``: its held-out loss): ``m_mean`` and ``m_sd`` (population standard
deviation over the scored clients, 0 for one client), under the round line's
``eval.personalized``, flattened as ``personalized/accuracy_mean`` in results and trackers.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from rblora.aggregation.running import ModuleDelta
from rblora.aggregation.types import Factors
from rblora.protocol.factors import FactorPlan
from rblora.protocol.types import ClientSpec, ClientStart

PERSONAL_METRICS = ("accuracy", "loss")
"""What a client's personalised evaluation reports (and all a node's reply may carry)."""
PERSONAL_STREAM = 0x9E  # derive_seed(seed, round, PERSONAL_STREAM): the capped sample (public)


def personal_delta(spec: ClientSpec, factors: Factors | None) -> dict[str, ModuleDelta]:
    """The client's LoRA as a delta on the base weights, ``{module: (A, s * B)}`` (its scale
    folded in, at the rank of the factors given); {} for a fresh LoRA (B zero)."""
    if not factors:
        return {}
    return {m: (a, b * spec.scale(int(a.shape[0]))) for m, (a, b) in sorted(factors.items())}


def client_figures(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """``{"accuracy", "loss", "examples"}`` of one client's evaluation (as
    :meth:`Task.evaluate_local` returns it; accuracy or loss may be absent: instruction records
    without choices have no accuracy); ``examples``: the held-out examples scored."""
    out: dict[str, float] = {"examples": int(evaluation["examples"])}
    suite = (evaluation.get("suites") or {}).get("local") or {}
    if isinstance(suite.get("accuracy"), (int, float)):
        out["accuracy"] = float(suite["accuracy"])
    if isinstance(evaluation.get("loss"), (int, float)):
        out["loss"] = float(evaluation["loss"])
    return out


def score_client(
    task,
    spec: ClientSpec,
    start: ClientStart,
    plan: FactorPlan,
    *,
    round_: int,
    local: Mapping[str, Any] | None = None,
) -> dict[str, float] | None:
    """The personalised figures after ``round_`` of client ``spec``, whose next start is
    ``start`` (as the server builds it; ``plan``: the method's protocol of the next round, which
    sets a frozen factor the server does not send), on its own held-out split; None when it
    holds nothing out. ``local``: the factor the client keeps of its own (FedSA-LoRA's B, as it
    trained it in its last round; None: none yet), which replaces the start's. The task's base
    weights and dense extras must be the global model's (both engines set them). The one
    scoring function of both engines."""
    if not plan.is_default:
        start = plan.client_start(spec, start, task.update_layout().modules, local)
    delta = personal_delta(spec, start.factors)
    evaluation = task.evaluate_local(spec.client_id, delta, round_=round_)
    return None if evaluation is None else client_figures(evaluation)


def check_figures(figures: Any, who: str) -> dict[str, float]:
    """A node's reported figures as the server counts them: a mapping of the names of
    :data:`PERSONAL_METRICS` (finite numbers, accuracy in [0, 1], loss >= 0) and ``examples``
    (an integer >= 1, which the caller checks against what it knows) only. ValueError
    naming ``who`` and the bad value otherwise (the server then drops the reply's figures)."""
    if not isinstance(figures, Mapping):
        raise ValueError(f"{who}: personalised figures must be a mapping, got {figures!r}")
    out = {}
    for name, value in figures.items():
        if name == "examples":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{who}: personalised examples {value!r} must be an integer >= 1")
            out[name] = value
            continue
        if name not in PERSONAL_METRICS:
            raise ValueError(
                f"{who}: unknown personalised figure {name!r}; valid: accuracy, loss, examples"
            )
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            raise ValueError(f"{who}: personalised {name} {value!r} is not a finite number")
        if (name == "accuracy" and not 0 <= value <= 1) or (name == "loss" and value < 0):
            valid = "in [0, 1]" if name == "accuracy" else ">= 0"
            raise ValueError(f"{who}: personalised {name} {value!r} must be {valid}")
        out[name] = float(value)
    return out


def summarize(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float | int]:
    """``{"clients": n, "<m>_mean", "<m>_sd"}`` over the clients scored (population standard
    deviation; a metric no client reported is left out)."""
    out: dict[str, float | int] = {"clients": len(per_client)}
    for name in PERSONAL_METRICS:
        values = [f[name] for _, f in sorted(per_client.items()) if name in f]
        if values:
            out[f"{name}_mean"] = statistics.fmean(values)
            out[f"{name}_sd"] = statistics.pstdev(values)
    return out


def chosen_clients(participants: list[int], cap: int, seed: int, round_: int) -> list[int]:
    """The clients scored after ``round_``: every participant, or with ``cap`` > 0 a seeded
    sample of ``cap`` of them (sorted)."""
    from rblora.federation.server import derive_seed

    if not cap or len(participants) <= cap:
        return sorted(participants)
    rng = np.random.default_rng(derive_seed(seed, round_, PERSONAL_STREAM))
    return sorted(int(participants[i]) for i in rng.choice(len(participants), cap, replace=False))


def evaluate_inprocess(
    task, server, round_: int, *, cap: int, seed: int, store=None
) -> dict[str, Any]:
    """After ``round_`` closed (the global model installed in ``task``): every chosen client's
    personalised figures, summarised (:func:`summarize`), with the seconds it took.
    ``store``: the clients' own kept factors (:mod:`.client_state`; None: the method keeps
    none), read on the client's side of the scoring only."""
    started = time.perf_counter()
    scored = {}
    plan = server.plan.at(round_ + 1)
    for k in chosen_clients(server.participants(), cap, seed, round_):
        start = ClientStart(server.start_of(k))  # base and dense: installed (the global model's)
        kept = store.load(k, round_ + 1) if store else None
        figures = score_client(task, server.clients[k], start, plan, round_=round_, local=kept)
        if figures is not None:
            scored[k] = figures
    return {**summarize(scored), "seconds": round(time.perf_counter() - started, 3)}
