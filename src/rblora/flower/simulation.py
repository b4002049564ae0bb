"""``train.py --engine flower``: the run on Flower's simulation runtime, on this machine.

One virtual SuperNode per client (node config ``partition-id``; its rank comes from the run's
options), the ServerApp in this process, the ClientApps in Ray worker processes, each reserving
``--client_num_cpus`` CPUs and ``--client_num_gpus`` GPUs (fractions allowed): Ray runs as many
clients at once as the machine's CPUs (and GPUs) allow. Same options, same seed: the same global
updates as the in-process engine, up to float rounding (the server sums the replies as they
arrive; workers run single-threaded).
"""

from __future__ import annotations

import os

from rblora.federation.options import TrainArgs


def backend_config(args: TrainArgs) -> dict:
    """Flower's Ray backend settings: each ClientApp reserves ``--client_num_cpus`` CPUs and
    ``--client_num_gpus`` GPUs; Ray gets every CPU of the machine and its GPUs when clients ask
    for some. ValueError when the clients ask for more than the machine has."""
    cpus = os.cpu_count() or 1
    gpus = 0
    if args.client_num_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if args.client_num_gpus > gpus:
            raise ValueError(
                f"--client_num_gpus {args.client_num_gpus:g}: each client would need more GPUs "
                f"than this machine's {gpus}"
            )
    if args.client_num_cpus > cpus:
        raise ValueError(
            f"--client_num_cpus {args.client_num_cpus:g}: each client would need more CPUs than "
            f"this machine's {cpus}"
        )
    init = {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True}
    if gpus:
        init["num_gpus"] = gpus
    return {
        "client_resources": {"num_cpus": args.client_num_cpus, "num_gpus": args.client_num_gpus},
        "init_args": init,
    }


def run_simulation_engine(args: TrainArgs, given: set[str] | None = None) -> dict:
    """Run ``args`` on Flower's simulation runtime; returns the results (as ``finish_run``)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # this process only: no network calls
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from rblora.flower.client_app import app as client_app
    from rblora.flower.server_app import serve

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context) -> None:
        try:
            outcome["results"] = serve(grid, args, given)
        except BaseException as err:  # re-raised below, in the caller's thread
            outcome["error"] = err

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.num_clients,
        backend_config=backend_config(args),
    )
    if "error" in outcome:
        raise outcome["error"]
    if "results" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the ServerApp")
    return outcome["results"]
