"""``--report_to tensorboard,mlflow``: every committed round's figures also go to trackers.

    <run folder>/tensorboard/     TensorBoard event files (``tensorboard --logdir <that folder>``)
    <run folder>/tracking.json    the MLflow run this run folder reports to (store URI, run id)
    <output_dir>/mlflow.db        the default MLflow store (SQLite; ``--mlflow_tracking_uri``)

What goes there, at step = the round (0: the base model, with ``--eval_base``)::

    <suite>/<metric>     each evaluation figure under its results.json name (dev/accuracy, ...)
    round/<name>         every other number of the round's metrics.jsonl line (train_loss,
                         bytes_up, bytes_down, aggregate_seconds, eval_seconds, round_seconds)
    client_<k>/<name>    every number of client k's line (loss, steps, tokens or images,
                         seconds, bytes_up, bytes_down, val_loss)

Under client-level DP metrics.jsonl holds only what may be released (the evaluation of the
noised model, epsilon, the adaptive clip; ``rblora.federation.rounds.RELEASED``), so that is
all a tracker receives: client lines and raw statistics stay in ``private/``.

An MLflow run also gets the run's options as parameters and the tags ``method``, ``seed``,
``ranks``, ``task``, ``engine``, ``run_folder`` and those of ``--mlflow_tags`` (``rblora
compare`` adds ``setting``); it is named ``[<setting>/]<method>/seed<s>``.

Only committed rounds are sent (after their checkpoint is written; round 0 once its line is),
read back from metrics.jsonl, so a tracker shows what the run folder holds. Each tracker knows
which rounds it has (MLflow: the steps of ``round/eval_seconds`` in the run; TensorBoard: the
same tag in its event files) and each :meth:`Trackers.sync` sends the committed rounds it
lacks. So a resumed run goes on in the same MLflow run (its id is kept in ``tracking.json``) and
the same TensorBoard folder from the first round they lack, without a step twice; a tracker
turned on when resuming receives the whole history; a round a tracker failed to take (a
tracking server down) is logged as a warning and sent again at the next sync, and training goes
on. TensorBoard's ``purge_step`` hides what a killed process wrote of a round sent again.

The packages are optional (``pip install 'rblora[tracking]'``: ``tensorboard`` and
``mlflow-skinny``, whose SQLite store uses SQLAlchemy and alembic); :func:`require_packages`
names a missing one before anything runs.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rblora.federation.options import report_targets
from rblora.federation.results import scalar_evals
from rblora.federation.rundir import RunFolder
from rblora.utils.atomic import write_json

#: Present in every round line (round 0 too, and under DP, whose lines hold only what may be
#: released) and sent last: a tracker with it at step t has round t.
MARKER = "round/eval_seconds"

#: (module imported, package to install) per tracker; the SQLite store needs sqlalchemy + alembic.
_NEEDS = {
    "tensorboard": [("tensorboard", "tensorboard")],
    "mlflow": [("mlflow", "mlflow-skinny"), ("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")],
}
#: Fields of a metrics line that say what it is about, not figures.
_IDENTITY = {"type", "round", "client", "node", "rank", "num_examples"}
#: MLflow's limits: characters of a parameter value, entries of one ``log_batch`` call.
_PARAM_CHARS, _BATCH_PARAMS, _BATCH_METRICS = 6000, 100, 1000


def require_packages(report_to: list[str]) -> None:
    """ValueError naming the first package a requested tracker lacks and how to install it."""
    for target in report_targets(report_to):
        for module, package in _NEEDS[target]:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(
                    f"--report_to {target} needs the {package} package: "
                    "pip install 'rblora[tracking]' (or leave out --report_to)"
                ) from None


def default_tracking_uri(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/mlflow.db`` (absolute), the store MLflow 3 recommends locally."""
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


# ---------------------------------------------------------------------- what is sent
def figures(round_record: dict[str, Any], client_records: list[dict[str, Any]]) -> dict:
    """One round's scalars, name -> value (see the module doc), :data:`MARKER` last."""
    out: dict[str, float] = {}
    for record in sorted(client_records, key=lambda r: r["client"]):
        for key, value in record.items():
            if key not in _IDENTITY and _is_number(value):
                out[f"client_{record['client']}/{key}"] = float(value)
    out.update(scalar_evals(round_record.get("eval")))
    for key, value in round_record.items():
        if key not in _IDENTITY and _is_number(value):
            out[f"round/{key}"] = float(value)
    if MARKER in out:
        out[MARKER] = out.pop(MARKER)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def committed_rounds(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """round -> its figures, for every round of ``records`` (metrics.jsonl lines) that has its
    round line (a round's client lines come before it)."""
    clients: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("type") == "client":
            clients.setdefault(r["round"], []).append(r)
    rounds = {r["round"]: r for r in records if r.get("type") == "round"}
    return {t: figures(rounds[t], clients.get(t, [])) for t in sorted(rounds)}


# ---------------------------------------------------------------------- the trackers of a run
class Trackers:
    """The trackers of one run; falsy when ``--report_to none``."""

    def __init__(self, backends: list, log: Callable[[str], None]):
        self.backends = backends
        self.log = log

    def __bool__(self) -> bool:
        return bool(self.backends)

    def sync(self, records: list[dict[str, Any]]) -> None:
        """Send each tracker the committed rounds of ``records`` it does not have yet. A tracker
        that fails is named in a warning and gets them at the next sync; training goes on."""
        if not self.backends:
            return
        rounds = committed_rounds(records)
        for backend in self.backends:
            todo = backend.pending(sorted(rounds))
            if not todo:
                continue
            try:
                backend.send({t: rounds[t] for t in todo})
            except Exception as err:  # a tracker never stops training; metrics.jsonl has it all
                self.log(
                    f"warning: --report_to {backend.name}: round(s) {todo[0]}..{todo[-1]} not "
                    f"sent ({type(err).__name__}: {err}); sent again after the next round"
                )

    def close(self, status: str = "FINISHED") -> None:
        """End every tracker; ``status`` is the MLflow run's: FINISHED, FAILED or KILLED."""
        for backend in self.backends:
            try:
                backend.close(status)
            except Exception as err:
                self.log(f"warning: --report_to {backend.name}: closing failed ({err})")


def open_trackers(
    args, folder: RunFolder, config: dict[str, Any], log: Callable[[str], None]
) -> Trackers:
    """The trackers ``args.report_to`` asks for, set up for ``folder``'s run (an MLflow run
    created, or the one in ``tracking.json`` continued). ValueError if a store cannot be used."""
    backends: list = []
    for target in report_targets(args.report_to):
        if target == "tensorboard":
            backends.append(TensorBoard(folder.path / "tensorboard"))
        else:
            backends.append(MLflow.open(args, folder, config, log))
    return Trackers(backends, log)


class TensorBoard:
    """Scalars in TensorBoard event files under ``path`` (one file per process)."""

    name = "tensorboard"

    def __init__(self, path: Path):
        self.path = path
        self._writer = None
        self._earlier = path.is_dir() and any(path.iterdir())  # files of an earlier process
        self.have = self._rounds_in_files() if self._earlier else set()

    def _rounds_in_files(self) -> set[int]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(self.path), size_guidance={"scalars": 0})
        events.Reload()  # applies earlier purges: a round hidden by one counts as missing
        if MARKER not in events.Tags().get("scalars", []):
            return set()
        return {e.step for e in events.Scalars(MARKER)}

    def pending(self, committed: list[int]) -> list[int]:
        missing = [t for t in committed if t not in self.have]
        if missing and self._writer is None and self._earlier:
            # the new file's purge_step hides every step from missing[0] on: send them all again
            return [t for t in committed if t >= missing[0]]
        return missing

    def send(self, rounds: dict[int, dict[str, float]]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = min(rounds) if self._earlier else None
            self._writer = SummaryWriter(str(self.path), purge_step=purge)
        for t, values in rounds.items():
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=t)
            self.have.add(t)
        self._writer.flush()

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()


class MLflow:
    """One MLflow run per run folder, its id kept in ``<run folder>/tracking.json``."""

    name = "mlflow"

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.have = {m.step for m in client.get_metric_history(run_id, MARKER)}

    @classmethod
    def open(cls, args, folder: RunFolder, config: dict[str, Any], log) -> MLflow:
        """Continue the run ``tracking.json`` names in the same store, else start one."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = args.mlflow_tracking_uri or default_tracking_uri(args.output_dir)
        state_path = folder.path / "tracking.json"
        try:
            state = json.loads(state_path.read_text()).get("mlflow") or {}
        except (OSError, ValueError, AttributeError):
            state = {}
        try:
            client = MlflowClient(tracking_uri=uri)
            run_id = state.get("run_id") if state.get("tracking_uri") == uri else None
            if run_id is not None and _usable(client, run_id):
                client.update_run(run_id, status="RUNNING")
                log(f"--report_to mlflow: continuing run {run_id} in {uri}")
            else:
                if run_id is not None:
                    log(f"--report_to mlflow: run {run_id} is gone from {uri}; starting another")
                experiment = args.mlflow_experiment or Path(args.output_dir).resolve().name
                run_id = _create_run(client, uri, experiment, args, folder, config)
                write_json(state_path, {"mlflow": {"tracking_uri": uri, "run_id": run_id}})
                log(f"--report_to mlflow: run {run_id} in experiment {experiment!r} of {uri}")
            return cls(client, run_id)
        except MlflowException as err:
            raise ValueError(f"--report_to mlflow: cannot use the store {uri}: {err}") from None

    def pending(self, committed: list[int]) -> list[int]:
        return [t for t in committed if t not in self.have]

    def send(self, rounds: dict[int, dict[str, float]]) -> None:
        from mlflow.entities import Metric

        for t, values in rounds.items():
            now = int(time.time() * 1000)
            metrics = [Metric(name, value, now, t) for name, value in values.items()]
            for i in range(0, len(metrics), _BATCH_METRICS):  # the marker is in the last batch
                self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH_METRICS])
            self.have.add(t)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _usable(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _create_run(
    client, uri: str, experiment: str, args, folder: RunFolder, config: dict[str, Any]
) -> str:
    """A new run in ``experiment`` (created if needed) with the run's tags and options."""
    from mlflow.entities import Param

    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage != "active":
        raise ValueError(
            f"--report_to mlflow: experiment {experiment!r} is deleted in the store; restore it "
            "(mlflow experiments restore) or give another --mlflow_experiment"
        )
    if found is None:
        # a SQLite store's artifacts beside its file, not in whatever folder the run started in
        local = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
        artifacts = (Path(local).resolve().parent / "mlartifacts").as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
    else:
        experiment_id = found.experiment_id
    tags = {
        "method": args.method,
        "seed": str(args.seed),
        "ranks": ",".join(map(str, config.get("client_ranks_resolved") or args.ranks())),
        "task": str(config.get("task_resolved") or args.task),
        "engine": args.engine,
        "run_folder": str(folder.path.resolve()),
        **(args.mlflow_tags or {}),
    }
    name = "/".join(filter(None, [tags.get("setting"), tags["method"], f"seed{args.seed}"]))
    run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    params = [Param(key, _param_text(value)) for key, value in config.items()]
    for i in range(0, len(params), _BATCH_PARAMS):
        client.log_batch(run_id, params=params[i : i + _BATCH_PARAMS])
    return run_id


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= _PARAM_CHARS else text[: _PARAM_CHARS - 14] + "...(truncated)"
