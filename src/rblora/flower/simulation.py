"""``train.py --engine flower``: the run on Flower's simulation runtime, on this machine.

One virtual SuperNode per client (node config ``partition-id``; its rank comes from the run's
options), the ServerApp in this process, the ClientApps in Ray worker processes, one CPU each.
Same options, same seed: the same global adapters as the in-process engine, up to float
rounding (workers run single-threaded).
"""

from __future__ import annotations

import os

from rblora.federation.options import TrainArgs


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

    cpus = os.cpu_count() or 1
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
        },
    )
    if "error" in outcome:
        raise outcome["error"]
    if "results" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the ServerApp")
    return outcome["results"]
