"""What every engine does before and after its rounds: lock, check, build, write config, restore.

``open_run`` holds the run folder's lock for the whole run, prepares it and tells a stopped run
from bad input; inside it, ``prepare_run`` checks everything that can be checked before anything
is written (the output folder, a resumed run's options, data and checkpoint, then the task:
model, data, ranks, evaluation sets), writes ``config.json``, creates the server and restores
it from the checkpoint when resuming. ``finish_run`` writes results.json, summary.md and the
plots, prints the table and deletes the run an ``--overwrite`` replaced. The in-process loop and
the Flower server both run between the two.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from rblora.aggregation import get_method
from rblora.federation import rundir
from rblora.federation.options import TrainArgs
from rblora.federation.rounds import RunError, install_global, log
from rblora.federation.server import FederatedServer
from rblora.federation.tracking import Trackers, open_trackers, require_packages
from rblora.protocol.types import ClientSpec
from rblora.tasks.base import Task


@dataclass
class PreparedRun:
    args: TrainArgs
    task: Task
    server: FederatedServer
    folder: rundir.RunFolder
    config: dict[str, Any]
    trackers: Trackers | None = None  # --report_to; set by open_run


@contextlib.contextmanager
def open_run(
    args: TrainArgs,
    given: set[str] | None = None,
    *,
    discover: Callable[[], dict[str, Any]] | None = None,
    **prepare_options: Any,
) -> Iterator[PreparedRun]:
    """The run from start to end, as every engine drives it (``finish_run`` inside the block).

    The run folder's lock is held throughout: a second run on the same folder is refused at
    once (``LockHeld``, a ValueError naming the folder and the process holding it). Under the
    lock, ``discover()`` (optional) learns what the engine needs before the run can be prepared
    (the Flower server's node discovery) and returns more ``prepare_run`` options. Errors of
    ``prepare_run`` are bad input found before anything was written; a ValueError or OSError
    raised after it (the folder holds this run's files) becomes a RunError saying so, never
    "bad input". The trackers of ``--report_to`` (their packages checked first of all) are
    opened once the run is prepared, receive the committed rounds they lack, and are closed
    with the run's outcome.
    """
    require_packages(args.report_to)
    with rundir.locked(args.run_dir()):
        if discover is not None:
            prepare_options.update(discover())
        run = prepare_run(args, given, **prepare_options)
        status = "FAILED"
        try:
            run.trackers = open_trackers(args, run.folder, run.config, log)
            run.trackers.sync(run.folder.read_metrics())  # a resumed run's earlier rounds
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except (ValueError, OSError) as err:
            done = run.server.completed_rounds
            raise RunError(
                f"{type(err).__name__}: {err} (raised after the run folder {run.folder.path} "
                f"was written; it keeps its {done} completed round(s): continue with --resume "
                "once the cause is fixed)"
            ) from err
        finally:
            if run.trackers is not None:
                run.trackers.close(status)


def prepare_run(
    args: TrainArgs,
    given: set[str] | None = None,
    *,
    clients: list[int] | None = None,
    client_sizes: list[int | None] | None = None,
) -> PreparedRun:
    """Check, build the task, write ``config.json``, create (and on resume restore) the server.

    ``clients``: the clients whose data this process holds and trains (None: every client, the
    in-process engine; ``[]``: a Flower server, which reads only the test set and the metadata).
    ``client_sizes``: each client's training examples as the server knows them when it holds no
    client data (from partition.json or the nodes; None where unknown); else the task's counts.
    """
    from rblora.data.federated import data_fingerprint
    from rblora.tasks import build_task, infer_task

    folder = rundir.RunFolder(args.run_dir(), private=args.private)
    if folder.holds_run() and not (args.resume or args.overwrite):
        raise ValueError(
            f"output folder {folder.path} already holds a run; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    ranks = args.ranks()
    fingerprint = data_fingerprint(args.data_path, args.num_clients)
    checkpoint = rundir.check_resume(folder, args, fingerprint) if args.resume else None
    recorded = folder.read_config().get("precision") if args.resume else None
    privacy = args.privacy()  # solves the noise for --dp_epsilon; refuses a budget out of reach

    # -- everything checked before anything is written (the task loads and checks the rest)
    task = build_task(precision_args(args, recorded), given, log=log, clients=clients)
    if clients is None:
        client_sizes = [task.num_examples(k) for k in range(args.num_clients)]
    elif client_sizes is None or len(client_sizes) != args.num_clients:
        raise ValueError(f"client_sizes must give {args.num_clients} counts, got {client_sizes}")
    if privacy is not None and None in client_sizes:
        unknown = [k for k, n in enumerate(client_sizes) if n is None]
        raise ValueError(
            f"client-level DP fixes every client's weight before the run, but the example counts "
            f"of clients {unknown} are unknown (give the data folder's partition.json or "
            "--client_dataset_size_dict)"
        )
    precision = {"bf16": bool(task.train_config.bf16), "threads": torch.get_num_threads()}
    if recorded is not None and recorded.get("threads") != precision["threads"]:
        log(
            f"warning: the run started with {recorded.get('threads')} torch threads, this process "
            f"has {precision['threads']}: float sums may round differently than in an "
            "uninterrupted run (set OMP_NUM_THREADS / torch.set_num_threads to match)"
        )

    # -- from here on the run folder is written
    config = {
        **args.to_dict(),
        "task_resolved": infer_task(args),
        "client_ranks_resolved": ranks,
        "client_sizes": list(client_sizes),
        "data_sha256": fingerprint,
        "base_model": task.base_reference,
        "precision": precision,
    }
    if privacy is not None:
        config["privacy"] = privacy.record()  # public settings: never the noise key
    if get_method(args.method).protocol.cycle[0].local:  # clients keep a factor between rounds
        config["client_state_id"] = client_state_id(folder, args.resume)
    if not args.resume:
        folder.start(config, log)  # an old run is set aside until this one completes
    specs = [
        ClientSpec(k, r, args.lora_alpha, args.use_rslora, num_examples=n)
        for k, (r, n) in enumerate(zip(ranks, client_sizes, strict=True))
    ]
    server = FederatedServer(
        args.method,
        specs,
        reduction=args.reduction_method,
        selection=args.client_selection_strategy,
        frac=args.client_selection_frac,
        sampling="poisson" if args.poisson() else "fixed",
        seed=args.seed,
        privacy=privacy,
        layout=task.update_layout(),
        svd_energy=args.svd_energy,
    )
    if args.resume:
        if privacy is not None and checkpoint is None:
            raise rundir.ResumeError(
                f"--resume: {folder.path / rundir.CHECKPOINT} is missing, and with it the run's "
                "secret DP noise key: resuming would draw other noise and release round 1 twice "
                "under independent noise (twice the privacy cost); start again with --overwrite"
            )
        done = restore(folder, server, task, checkpoint)
        log(f"resuming after round {done}" if done else "nothing completed yet: from round 1")
    else:
        folder.clear_metrics()
        if privacy is not None:  # the noise key is kept before anything is released
            tensors, meta = server.state_tensors()
            folder.save_checkpoint(tensors, meta)
    log(
        f"{args.method} ({server.reduction or 'default'} redistribution), {args.num_clients} "
        f"clients, ranks {_listing(ranks)}, sizes {_listing(config['client_sizes'])}, "
        f"{args.num_communication_rounds} rounds, engine {args.engine}"
    )
    if privacy is not None:
        log(privacy.describe())
    return PreparedRun(args, task, server, folder, config)


def _listing(values: list, shown: int = 20, distinct: int = 8) -> str:
    """``values`` as a run's header shows them: the list itself when at most ``shown``, else
    the clients at each value (at most ``distinct`` values) or the range, median and total (a
    header of 10,000 clients stays one readable line)."""
    if len(values) <= shown:
        return str(list(values))
    counts = Counter(values)
    if len(counts) <= distinct:
        return ", ".join(f"{v} for {n} clients" for v, n in sorted(counts.items()))
    ordered = sorted(values)
    return (
        f"{len(values)} values from {ordered[0]} to {ordered[-1]} (median "
        f"{ordered[len(ordered) // 2]}, total {sum(ordered)})"
    )


def client_state_id(folder: rundir.RunFolder, resume: bool) -> str:
    """A public label of this run for the nodes' kept factors (FedSA-LoRA's B): random for a new
    run, the recorded one for a resumed run (``config.json``), so a node tells this run's state
    from that of an earlier run with the same output folder, method and seed (an
    ``--overwrite`` run starts from nothing kept). Not a secret: it only names a folder."""
    import secrets

    if resume:
        return str(folder.read_config().get("client_state_id", ""))
    return secrets.token_hex(8)


def precision_args(args: TrainArgs, recorded: dict | None) -> TrainArgs:
    """``args`` with ``bf16`` fixed to the run's recorded decision (``config.json``'s
    ``precision``), so a resumed run and every node compute in the precision the run started
    with, whatever a timing on this machine would say; ``args`` itself when nothing is recorded
    (a new run decides, and records, its own)."""
    if not recorded or not isinstance(recorded.get("bf16"), bool):
        return args
    return replace(args, bf16="true" if recorded["bf16"] else "false")


def restore(folder: rundir.RunFolder, server: FederatedServer, task: Task, checkpoint) -> int:
    """Load ``checkpoint`` (verified by ``rundir.check_resume``; None: the run has none yet) into
    ``server``, install its global state in ``task`` and drop the metrics of an interrupted round.
    Returns the number of completed rounds."""
    if checkpoint is not None:
        tensors, meta = checkpoint
        try:
            server.load_state_tensors(tensors, meta)
        except (KeyError, ValueError, TypeError) as err:
            raise rundir.ResumeError(
                f"--resume: the checkpoint in {folder.path / rundir.CHECKPOINT} does not fit "
                f"this run ({err})"
            ) from None
        install_global(task, server)
    folder.check_consistent(server.completed_rounds)
    folder.truncate_metrics(server.completed_rounds)
    return server.completed_rounds


def finish_run(run: PreparedRun) -> dict[str, Any]:
    """Write results.json, summary.md and the plots; print the table; return the results."""
    from rblora.federation.results import markdown_table, write_report

    results = write_report(run.folder.path, run.folder.read_metrics(), run.folder.read_config())
    rundir.drop_replaced(run.folder.path)  # the run completed: the one it replaced can go
    print(markdown_table(results), end="")
    print(f"results: {run.folder.path / 'results.json'}")
    return results
