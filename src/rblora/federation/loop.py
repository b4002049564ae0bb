"""The in-process engine: every client trains in this process, one after the other.

It keeps only iteration, progress, metrics and the checkpoint; each step of a round is a function
of :mod:`rblora.federation.rounds`, shared with the Flower driver. Each round is repeatable:
selection and every client's seed derive from the run seed, the round and the client id, so a run
resumed from a checkpoint ends with the same adapters.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rblora.federation import personal, rounds
from rblora.federation.client_state import run_store
from rblora.federation.rundir import RunFolder
from rblora.federation.saving import SavePlan, plan_for
from rblora.federation.server import FederatedServer, derive_seed
from rblora.federation.tracking import Trackers
from rblora.tasks.base import Task


@dataclass
class LoopOptions:
    num_rounds: int
    seed: int
    save_client_adapters: bool = True
    record_clients: bool = True  # one metrics line per client (else the round's sums only)
    progress: bool = True
    eval_base: bool = False  # evaluate the untouched base model first, recorded as round 0
    save_every: int = 1  # write round folders every this many rounds and the last (saving.py)
    keep_last: int = 0  # keep the newest this many round folders; 0: all
    eval_personalized: bool = False  # score each client's own model on its held-out split
    personalized_clients: int = 0  # at most this many of them a round (seeded sample); 0: all


def run_rounds(
    task: Task,
    server: FederatedServer,
    folder: RunFolder,
    options: LoopOptions,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    trackers: Trackers | None = None,
) -> list[dict[str, Any]]:
    """Run rounds ``server.completed_rounds + 1 .. options.num_rounds``; returns their records.
    ``trackers``: where each committed round is also sent (``--report_to``).

    To resume, restore ``server`` from the checkpoint and install it in the task first
    (:func:`rblora.federation.setup.restore`).
    """
    from tqdm import tqdm

    folder.path.mkdir(parents=True, exist_ok=True)
    saving = SavePlan(options.save_every, options.keep_last, options.num_rounds)
    done: list[dict[str, Any]] = []
    first = server.completed_rounds + 1
    if options.eval_base and first == 1:
        done += rounds.evaluate_base_once(task, folder, trackers)
    bar = tqdm(
        range(first, options.num_rounds + 1),
        desc="rounds",
        initial=first - 1,
        total=options.num_rounds,
        disable=not options.progress,
        file=sys.stderr,
        position=0,
    )
    # the clients' own factors (FedSA-LoRA's B): client-side state the server never reads
    # (under DP with the clients' adapters in private/: they are the clients' raw data)
    local = server.plan.local
    store = run_store(folder.private_dir() if local and folder.private else folder.path, local)
    for t in bar:
        started = time.perf_counter()
        saving.begin_round(folder, t)
        selected = server.select(t)
        tally = rounds.RoundTally()
        for k in tqdm(
            selected,
            desc=f"round {t} clients",
            leave=False,
            disable=not options.progress,
            file=sys.stderr,
            position=1,
        ):
            spec = server.clients[k]
            start = server.deliver(k)
            seed = derive_seed(options.seed, t, k)
            kept = store.load(k, t) if store else None  # the client's own, not the server's
            result = rounds.train_client(
                task, spec, start, seed=seed, round_=t, private=server.privacy is not None,
                plan=server.round_plan, local=kept,
            )  # fmt: skip
            if store:
                store.save(k, t, result.factors)
            update = rounds.client_update(spec, result, server.round_plan)
            if options.save_client_adapters and saving.saves(t):
                rounds.save_client_adapter(task, folder, t, spec, update)
            up = rounds.upload_bytes(update, server.round_plan)
            record = rounds.client_record(t, spec, result, start, up)
            server.fold(update)  # into the round's running sums; the update can go
            rounds.keep_client_record(folder, record, tally, options.record_clients)
        record = rounds.close_round(
            task,
            server,
            folder,
            t,
            tally,
            started=started,
            selected=selected,
            export=saving.saves(t),
        )
        if options.eval_personalized:  # the global model is installed: each client's on top
            figures = personal.evaluate_inprocess(
                task, server, t, cap=options.personalized_clients, seed=options.seed, store=store
            )
            rounds.keep_personal(record, figures, folder.private)
        rounds.commit_round(server, folder, record, trackers)
        saving.end_round(folder, t)
        done.append(record)
        if on_round is not None:
            on_round(record)
    return done


def run_inprocess(args, given: set[str] | None = None) -> dict[str, Any]:
    """The ``inprocess`` engine (see :mod:`rblora.federation.engines`): prepare the run, its
    rounds in this process, the results."""
    from rblora.federation.setup import finish_run, open_run

    with open_run(args, given) as run:
        plan, bound = plan_for(args, run.task.update_layout())
        rounds.log(plan.describe(bound))
        options = LoopOptions(
            num_rounds=args.num_communication_rounds,
            seed=args.seed,
            save_client_adapters=args.saves_client_adapters(),
            record_clients=args.records_clients(),
            progress=args.progress,
            eval_base=args.eval_base,
            save_every=plan.every,
            keep_last=plan.keep_last,
            eval_personalized=args.eval_personalized,
            personalized_clients=args.eval_personalized_clients,
        )
        run_rounds(run.task, run.server, run.folder, options, trackers=run.trackers)
        return finish_run(run)
