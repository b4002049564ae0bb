"""``rblora compare``: methods x rank settings x seeds on one prepared setting, one table.

    rblora compare --methods RB-LoRA,FLoRA --seeds 1,2,3 --output_dir ./outputs/compare \
        -- --config configs/embedded.yaml
    rblora compare --rank_settings "heterogeneous;smallest;wide=8,8,64,64" -- --config ...

Everything after ``--`` is train.py's options, the same for every cell (each cell changes only the
method, the client ranks and the seed). Each cell is a normal run folder
``<output_dir>/<setting>/<method>/seed<s>/<num_clients>/``: a finished cell is kept, an unfinished
one is resumed, so a killed comparison goes on where it stopped. A cell whose run stopped
(``RunError``: a client's training diverged) records why in
``<output_dir>/<setting>/<method>/seed<s>/failed.txt`` and later invocations keep it as failed: it
is a result, and resumed with the same seed it would most likely stop again. ``--retry_failed``
runs failed cells again (after a stop that was not the method's doing, e.g. a Flower node that did
not reply); a cell that finishes loses its ``failed.txt``. The table and plots use the finished
cells; failed and unfinished seeds are named beside the count. The base model is evaluated once
(round 0 of the first cell; a resumed cell keeps the choice it started with). At the end
``<output_dir>/comparison.md`` holds the table (mean and standard deviation over seeds of each
metric after round 1 and after the last round, communication per round and aggregation time)
and ``<output_dir>/plots/`` one PNG per metric (mean per round, a band of one standard
deviation). Below the table, each method against a reference method
(``--reference``, default RB-LoRA) on the same items: the paired difference, its 95% bootstrap
interval and a p-value (:mod:`rblora.experiments.differences`), from the per-item outcomes the
cells keep (``evaluation/round_<t>.json``); ``comparison.json`` holds them for every round.
``rblora report <output_dir>`` rebuilds all of it from the cells' metrics and outcomes.
A comparison may be split over calls (``--methods`` or ``--seeds`` a part each, one after another
or in parallel processes) on one ``--output_dir`` with the same train options: each call runs its
own cells and adds them to the folder's ``compare.json``, so the table has every part.

``--data_seeds 1,2`` makes the data partition a seed too: one data folder per partition seed,
prepared with the options of the given one (:mod:`rblora.experiments.data_seeds`); the replicates
are then (data seed, seed) pairs, cells ``<setting>/<method>/data<d>/seed<s>/``.

With ``--report_to mlflow`` among train.py's options the comparison is one MLflow experiment named
after ``--output_dir``'s folder, in ``<output_dir>/mlflow.db`` (unless ``--mlflow_tracking_uri``
and ``--mlflow_experiment`` say otherwise), each cell one run tagged with its setting, method and
seed; with ``--report_to tensorboard`` each cell writes event files in its own run folder
(``tensorboard --logdir <output_dir>`` shows them side by side).

Rank settings: ``heterogeneous`` (the options' client ranks), ``smallest`` (every client at the
smallest of them), ``uniform`` (every client at their rounded mean), or ``name=r0,r1,...``.
Methods that need one rank (FedIT) run only in settings with one rank; ``method@setting`` runs a
method in that setting only. For the image task the method list may hold ``head-only``: the
baseline without LoRA.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

from rblora.utils.options import OptionParser, int_list, split_passthrough

HEAD_ONLY = "head-only"
#: The method the others are compared to item by item unless ``--reference`` names another.
DEFAULT_REFERENCE = "RB-LoRA"
INDEX = "compare.json"
#: The paired differences to the reference, every metric and round (comparison.md shows the last).
PAIRED = "comparison.json"
#: A cell's record of why its run stopped, in ``<output_dir>/<cell path>/``.
FAILED = "failed.txt"


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", name.lower()).strip("-")


#: A setting name is a folder under --output_dir: plain characters only, never a path.
_SETTING_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_setting_name(name: str) -> None:
    """Refuse a setting name that is not a plain folder name (``/srv/x``, ``../x``, ``..``)."""
    if not _SETTING_NAME.fullmatch(name) or not name.strip("."):
        raise ValueError(
            f"rank setting name {name!r} is not allowed: it names a folder under --output_dir, "
            "so use only the characters A-Za-z0-9_.- (not only dots), e.g. wide=8,8,64"
        )


def rank_settings(names: list[str], ranks: list[int]) -> dict[str, list[int]]:
    """Setting name -> client ranks (see the module doc)."""
    out: dict[str, list[int]] = {}
    for item in names:
        name, _, custom = item.partition("=")
        check_setting_name(name)
        if name in out:
            raise ValueError(f"rank setting {name!r} given twice; give each setting once")
        if custom:
            values = int_list(custom, f"rank setting {item!r}")
            if len(values) != len(ranks):
                raise ValueError(f"rank setting {item!r} has {len(values)} ranks, not {len(ranks)}")
            out[name] = values
        elif name == "heterogeneous":
            out[name] = list(ranks)
        elif name == "smallest":
            out[name] = [min(ranks)] * len(ranks)
        elif name == "uniform":
            out[name] = [round(sum(ranks) / len(ranks))] * len(ranks)
        else:
            raise ValueError(
                f"unknown rank setting {name!r}; valid: heterogeneous, smallest, uniform, "
                "name=r0,r1,..."
            )
    return out


def plan(
    methods: list[str],
    seeds: list[int],
    settings: dict[str, list[int]],
    data_paths: dict[int, Path] | None = None,
) -> list[dict]:
    """The cells: one per (setting, method, replicate) that the method can run. A replicate is
    a seed, or with ``data_paths`` (data seed -> its ``--data_path``) a (data seed, seed) pair."""
    from rblora.aggregation import get_method

    for entry in methods:
        only = entry.partition("@")[2]
        if only and only not in settings:
            raise ValueError(f"{entry}: no rank setting {only!r} (have {', '.join(settings)})")
    cells = []
    for setting, ranks in settings.items():
        for entry in methods:
            method, _, only = entry.partition("@")
            if only and only != setting:
                continue  # "FedIT@smallest": that setting only
            if method != HEAD_ONLY and get_method(method).homogeneous_ranks and len(set(ranks)) > 1:
                continue  # FedIT averages factors of one shape
            for data_seed in data_paths or [None]:
                for seed in seeds:
                    path = Path(setting) / _slug(method)
                    if data_seed is not None:
                        path = path / f"data{data_seed}"
                    cell = {"setting": setting, "method": method, "seed": seed, "ranks": ranks,
                            "path": str(path / f"seed{seed}")}  # fmt: skip
                    if data_seed is not None:
                        cell.update(data_seed=data_seed, data_path=str(data_paths[data_seed]))
                    cells.append(cell)
    return cells


def replicate(cell: dict) -> tuple[int | None, int]:
    """A cell's replicate: (data seed or None, seed)."""
    return cell.get("data_seed"), cell["seed"]


def replicate_label(key: tuple[int | None, int]) -> str:
    """``seed 2`` or ``data 1 seed 2``."""
    data_seed, seed = key
    return f"seed {seed}" if data_seed is None else f"data {data_seed} seed {seed}"


def _evaluates_base(cells: list[dict]) -> set[int]:
    """Indices of the cells that evaluate the base model: the first of each data seed (its
    test set is the data seed's)."""
    first: dict = {}
    for i, cell in enumerate(cells):
        first.setdefault(cell.get("data_seed"), i)
    return set(first.values())


def _started_evaluating_base(run_dir: Path, default: bool) -> bool:
    """Whether the cell in ``run_dir`` was started with ``--eval_base``: which cell evaluates
    the base depends on the cells of the call (``--seeds``, ``--methods``), so a call with other
    cells must not change it on resume. ``default`` if the config cannot be read (the resume
    itself then says what is wrong)."""
    from rblora.federation.rundir import ResumeError, RunFolder

    try:
        return bool(RunFolder(run_dir).read_config().get("eval_base", default))
    except ResumeError:
        return default


def _cell_argv(base: list[str], cell: dict, root: Path, first: bool, args) -> list[str]:
    """A cell's train.py options; ``args``: the parsed ``base`` (for its MLflow options)."""
    argv = [*base, "--output_dir", str(root / cell["path"]), "--seed", str(cell["seed"])]
    argv += _tracking_argv(args, cell, root)
    argv += ["--client_ranks", ",".join(map(str, cell["ranks"]))]
    if cell["method"] == HEAD_ONLY:
        argv += ["--head_only"]
    else:
        argv += ["--method", cell["method"]]
    argv += ["--eval_base" if first else "--no_eval_base"]
    if "data_path" in cell:
        argv += ["--data_path", cell["data_path"]]
    return argv


def _tracking_argv(args, cell: dict, root: Path) -> list[str]:
    """With ``--report_to mlflow``: the comparison is one MLflow experiment, named after its
    folder, in one store (``<output_dir>/mlflow.db`` unless the options give one), and each
    cell one run tagged with its setting and method (train.py tags the seed)."""
    from rblora.federation.options import report_targets
    from rblora.federation.tracking import default_tracking_uri

    if "mlflow" not in report_targets(args.report_to):
        return []
    uri = args.mlflow_tracking_uri or default_tracking_uri(root)
    experiment = args.mlflow_experiment or root.resolve().name
    tags = {**(args.mlflow_tags or {}), "setting": cell["setting"], "method": cell["method"]}
    if cell.get("data_seed") is not None:
        tags["data_seed"] = str(cell["data_seed"])
    return [
        "--mlflow_tracking_uri", uri, "--mlflow_experiment", experiment,
        "--mlflow_tags", json.dumps(tags),
    ]  # fmt: skip


def _state(run_dir: Path, rounds: int) -> str:
    """done | resume | new."""
    results = run_dir / "results.json"
    if results.is_file():
        try:
            if json.loads(results.read_text()).get("rounds_completed", 0) >= rounds:
                return "done"
        except ValueError:
            pass
    return "resume" if (run_dir / "config.json").is_file() else "new"


def run_compare(
    base_argv: list[str], methods: list[str], seeds: list[int], setting_names: list[str],
    root: Path, retry_failed: bool = False, *, data_seeds: list[int] | None = None,
    reference: str | None = None,
) -> dict:  # fmt: skip
    """Run every cell (skipping finished ones, and failed ones unless ``retry_failed``), then
    write the table and plots. ``data_seeds``: one prepared folder per partition seed
    (:mod:`rblora.experiments.data_seeds`), replicates (data seed, seed); ``reference``: the
    method the others are compared to item by item (default RB-LoRA, else the first). The
    cells join those a call with the same train options listed in ``root`` (:func:`merge_index`):
    the table has every part of a comparison split over calls."""
    from rblora.federation.cli import run
    from rblora.federation.options import parse_args
    from rblora.federation.rounds import RunError, log
    from rblora.federation.tracking import require_packages
    from rblora.tasks import infer_task
    from rblora.utils.atomic import write_json, write_text
    from rblora.utils.lockfile import hold
    from rblora.utils.records import read_json

    args, _ = parse_args(base_argv)
    settings = rank_settings(setting_names, args.ranks())
    cells = plan(methods, seeds, settings)  # on the given data: checked before anything runs
    if not cells:
        raise ValueError("no cell to run: every method needs a rank setting it cannot take")
    index = {"base_argv": base_argv, "cells": cells, "num_clients": args.num_clients,
             "rounds": args.num_communication_rounds, "reference": reference,
             "data_seeds": data_seeds or None}  # fmt: skip
    earlier = read_json(root / INDEX) if (root / INDEX).is_file() else None
    merged = merge_index(earlier, index)  # the reference may be a method of an earlier part
    choose_reference(merged["cells"], merged["reference"])
    for i, cell in enumerate(cells):  # every cell's options are checked first
        try:
            cell_args, given = parse_args(_cell_argv(base_argv, cell, root, i == 0, args))
            cell_args.check_task_options(infer_task(cell_args), given)
            require_packages(cell_args.report_to)
        except ValueError as err:
            raise ValueError(f"{cell['setting']} / {cell['method']}: {err}") from None
    if data_seeds:  # the same cells on each data seed's folder (prepared with the same options)
        from rblora.experiments.data_seeds import data_folders

        paths = data_folders(Path(args.data_path), args.num_clients, data_seeds, root, log)
        cells = plan(methods, seeds, settings, paths)
    base_cells = _evaluates_base(cells)
    index["cells"] = cells
    # processes sharing the folder add their cells in turn (each holds the lock a moment)
    with hold(root / f".{INDEX}.lock", f"{root / INDEX}", wait=60):
        earlier = read_json(root / INDEX) if (root / INDEX).is_file() else None
        if earlier is not None and not same_comparison(earlier, index):
            log(f"{root / INDEX} listed a comparison with other train options: replaced")
        write_json(root / INDEX, merge_index(earlier, index), indent=1)
    for i, cell in enumerate(cells, start=1):
        run_dir = root / cell["path"] / str(args.num_clients)
        failed = root / cell["path"] / FAILED
        state = _state(run_dir, args.num_communication_rounds)
        label = (
            f"cell {i}/{len(cells)}: {cell['setting']} / {cell['method']} / "
            f"{replicate_label(replicate(cell))}"
        )
        if state == "done":
            failed.unlink(missing_ok=True)  # stale: the cell was finished since it failed
            log(f"{label}: finished earlier, kept")
            continue
        if failed.is_file() and not retry_failed:
            log(f"{label}: failed earlier, kept as failed (see {failed}; --retry_failed runs it)")
            continue
        log(f"{label}{' (resuming)' if state == 'resume' else ''}")
        evaluates_base = i - 1 in base_cells
        if state == "resume":  # as it started: the call that started it may have had other cells
            evaluates_base = _started_evaluating_base(run_dir, evaluates_base)
        argv = _cell_argv(base_argv, cell, root, evaluates_base, args)
        argv += ["--resume"] if state == "resume" else ["--overwrite"]
        cell_args, given = parse_args(argv)
        start = time.perf_counter()
        try:
            run(cell_args, given)
        except RunError as err:  # a method that diverges is a result, not a crash
            log(f"{label}: stopped: {err}")
            write_text(failed, str(err) + "\n")
        else:
            failed.unlink(missing_ok=True)  # retried and finished: no longer failed
        log(f"{label}: {time.perf_counter() - start:.0f} s")
    return write_comparison(root, reference)


def same_comparison(earlier: dict, index: dict) -> bool:
    """Whether ``earlier`` (a folder's ``compare.json``) lists cells of the comparison ``index``
    is a part of: the same train options, clients and rounds, and data seeds or not."""
    keys = ("base_argv", "num_clients", "rounds")
    return all(earlier.get(k) == index[k] for k in keys) and (
        earlier.get("data_seeds") is None
    ) == (index["data_seeds"] is None)


def merge_index(earlier: dict | None, index: dict) -> dict:
    """The index of a comparison folder after a call with ``index``'s cells. A call with the
    same train options (:func:`same_comparison`) adds its cells to those ``earlier`` lists, so
    processes that split one comparison by ``--methods`` or ``--seeds`` (one after another or
    at once) fill one table; other options replace the index. The reference asked for, else
    the one asked for earlier (None: :func:`choose_reference`'s default)."""
    if earlier is None or not same_comparison(earlier, index):
        return index
    mine = {cell["path"]: cell for cell in index["cells"]}
    cells = [mine.pop(cell["path"], cell) for cell in earlier["cells"]]
    data_seeds = index["data_seeds"] and sorted({*earlier["data_seeds"], *index["data_seeds"]})
    return {
        **index,
        "cells": cells + list(mine.values()),
        "reference": index["reference"] or earlier.get("reference"),
        "data_seeds": data_seeds or None,
    }


def choose_reference(cells: list[dict], reference: str | None) -> str:
    """The reference method of the paired differences: ``reference`` (a method of the cells,
    or ``method@setting``), else RB-LoRA if it runs, else the first method. ValueError naming
    the valid values."""
    groups = list(dict.fromkeys((c["setting"], c["method"]) for c in cells))
    methods = list(dict.fromkeys(m for _, m in groups))
    if reference is None:
        return DEFAULT_REFERENCE if DEFAULT_REFERENCE in methods else methods[0]
    method, _, setting = reference.partition("@")
    if (not setting and method in methods) or (setting, method) in groups:
        return reference
    raise ValueError(
        f"--reference {reference!r} is not a method of this comparison; valid: "
        f"{', '.join(methods)} (or method@setting: "
        f"{', '.join(f'{m}@{s}' for s, m in groups)})"
    )


def reference_group(groups, reference: str) -> tuple[str, str]:
    """The (setting, method) of ``reference``: ``method@setting``, or the method in the first
    setting it runs in."""
    method, _, setting = reference.partition("@")
    return next(g for g in groups if g[1] == method and (not setting or g[0] == setting))


# ---------------------------------------------------------------------- table and plots
def cell_rounds(root: Path, cell: dict, num_clients: int) -> list[dict] | None:
    """The round rows of one cell as its summary has them (``round``, ``test/accuracy``, ...,
    ``dp_epsilon`` under DP), rounds it did not reach left out; None if it never started."""
    from rblora.federation.results import summarize
    from rblora.federation.rundir import RunFolder

    folder = RunFolder(root / cell["path"] / str(num_clients))
    if not folder.config_path.is_file():
        return None
    return summarize(folder.read_metrics(), folder.read_config())["rounds"]


def shown_option(value: str, limit: int = 120) -> str:
    """A train option's value as a comparison's header shows it: a long comma-separated list
    (the ranks of 10,000 clients) cut to its first items and its length; anything else as is
    (``compare.json`` keeps every option whole)."""
    if len(value) <= limit or "," not in value:
        return value
    items = value.split(",")
    head = ",".join(items[:10])
    return f"{head},... ({len(items)} values)"


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def collect(root: Path) -> dict:
    """Per (setting, method): per round, per metric, the values over the replicates whose cell
    finished every round, and per round and replicate the per-item outcomes of those cells; the
    replicates of failed and of unfinished cells are listed apart (their partial rounds would
    mix replicates that stopped early into the means)."""
    from rblora.experiments.differences import cell_outcomes
    from rblora.utils.records import read_json

    index = read_json(root / INDEX)
    groups: dict[tuple[str, str], dict] = {}
    base_values: dict[str, list[float]] = {}
    for cell in index["cells"]:
        rounds = cell_rounds(root, cell, index["num_clients"]) or []
        group = groups.setdefault(
            (cell["setting"], cell["method"]),
            {"replicates": [], "rounds": {}, "items": {}, "failed": [], "unfinished": []},
        )
        for r in rounds:  # the base model (round 0) is the same whatever became of the cell
            if r["round"] == 0:
                for k, v in r.items():
                    if "/" in k and v is not None:
                        base_values.setdefault(k, []).append(float(v))
        rep = replicate(cell)
        if sum(1 for r in rounds if r["round"] >= 1) < index["rounds"]:
            failed = (root / cell["path"] / FAILED).is_file()
            group["failed" if failed else "unfinished"].append(rep)
            continue
        group["replicates"].append(rep)
        for r in rounds:
            if r["round"] == 0:
                continue
            slot = group["rounds"].setdefault(r["round"], {})
            for key, value in r.items():
                if value is not None and ("/" in key or key in _COSTS):
                    slot.setdefault(key, []).append(float(value))
            if "dp_epsilon" in r:  # a DP cell; None: noise multiplier 0, no guarantee
                eps = r["dp_epsilon"]
                slot.setdefault("dp_epsilon", []).append(math.inf if eps is None else eps)
        label = f"{cell['setting']} / {cell['method']} / {replicate_label(rep)}"
        run_dir = root / cell["path"] / str(index["num_clients"])
        for t, suites in cell_outcomes(run_dir, rounds, label).items():
            group["items"].setdefault(t, {})[rep] = suites
    # one base evaluation per data seed (each has its own test set): their mean
    base = {k: statistics.fmean(v) for k, v in base_values.items()}
    return {"index": index, "groups": groups, "base": base}


_COSTS = ("bytes_up", "bytes_down", "aggregate_seconds")


def comparison_table(data: dict) -> str:
    groups, base = data["groups"], data["base"]
    last = data["index"]["rounds"]
    metrics = sorted(
        {k for g in groups.values() for slot in g["rounds"].values() for k in slot if "/" in k},
        key=lambda k: (not k.endswith("accuracy"), k),
    )
    skip = ("perplexity", "acc_norm", "macro_accuracy", "_ci95")
    metrics = [m for m in metrics if not m.endswith(skip)]
    shown = [1] if last == 1 else [1, last]
    head = ["setting", "method", "replicates" if data["index"].get("data_seeds") else "seeds"]
    head += [f"{m} r{t}" for m in metrics for t in shown]
    private = any("dp_epsilon" in g["rounds"].get(last, {}) for g in groups.values())
    if private:  # the privacy spent by the end: the same in every seed of a cell's options
        head.insert(3, f"DP epsilon r{last}")
    head += ["MB up/round", "MB down/round", "agg s/round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base:
        cells = ["-", "base model", "-"] + ["-"] * private
        cells += [(f"{base[m]:.3f}" if m in base else "-") for m in metrics for _ in shown]
        lines.append("| " + " | ".join(cells + ["-", "-", "-"]) + " |")
    for (setting, method), g in groups.items():
        cells = [setting, method, str(len(g["replicates"]))]
        if private:
            spent = sorted(set(g["rounds"].get(last, {}).get("dp_epsilon", [])))
            cells.append(" / ".join(f"{e:.3g}" for e in spent) or "no DP")
        for m in metrics:
            for t in shown:
                cells.append(_fmt(g["rounds"].get(t, {}).get(m, [])))
        every = [slot for slot in g["rounds"].values()]
        for key, scale, digits in (
            ("bytes_up", 2**20, 1), ("bytes_down", 2**20, 1), ("aggregate_seconds", 1, 2),
        ):  # fmt: skip
            values = [v / scale for slot in every for v in slot.get(key, [])]
            cells.append(f"{statistics.fmean(values):.{digits}f}" if values else "-")
        cells[2] += _seed_note(g)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seed_note(group: dict) -> str:
    """`` (seed 2 failed: see failed.txt; seed 3 unfinished)`` or ``""`` (``data 1 seed 2``
    with data seeds)."""
    notes = []
    for key, what in (("failed", f"failed: see {FAILED}"), ("unfinished", "unfinished")):
        reps = group[key]
        if reps and all(d is None for d, _ in reps):
            seeds = [str(s) for _, s in reps]
            notes.append(f"seed{'s' * (len(seeds) > 1)} {', '.join(seeds)} {what}")
        elif reps:
            notes.append(f"{', '.join(map(replicate_label, reps))} {what}")
    return f" ({'; '.join(notes)})" if notes else ""


def replicates_line(index: dict) -> str:
    """Which replicates the comparison has: its seeds, or its (data seed, seed) pairs."""
    seeds = sorted({c["seed"] for c in index["cells"]})
    data_seeds = index.get("data_seeds")
    if not data_seeds:
        return (
            f"- replicates: seeds {', '.join(map(str, seeds))} (one data partition: "
            "the train options' --data_path)"
        )
    pairs = ", ".join(f"({d}, {s})" for d in data_seeds for s in seeds)
    return (
        f"- replicates: (data seed, seed) pairs {pairs}: data seeds "
        f"{', '.join(map(str, data_seeds))} (partitions prepared with the same options) x "
        f"seeds {', '.join(map(str, seeds))}"
    )


def write_plots(root: Path, data: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from rblora.utils.atomic import atomic_file

    groups = data["groups"]
    metrics = sorted(
        {
            k
            for g in groups.values()
            for slot in g["rounds"].values()
            for k in slot
            if "/" in k and not k.endswith("_ci95")
        }
    )
    out = root / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (setting, method), g in groups.items():
            rounds = sorted(t for t, slot in g["rounds"].items() if slot.get(metric))
            if not rounds:
                continue
            means = [statistics.fmean(g["rounds"][t][metric]) for t in rounds]
            sds = [
                statistics.stdev(v) if len(v := g["rounds"][t][metric]) > 1 else 0.0 for t in rounds
            ]
            label = method if len({s for s, _ in groups}) == 1 else f"{method} ({setting})"
            ax.plot(rounds, means, marker="o", label=label)
            ax.fill_between(
                rounds,
                [m - s for m, s in zip(means, sds, strict=True)],
                [m + s for m, s in zip(means, sds, strict=True)],
                alpha=0.15,
            )
        if metric in data["base"]:
            ax.axhline(data["base"][metric], color="grey", linestyle="--", label="base model")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean over seeds, band = 1 sd")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric.replace('/', '_')}.png"
        with atomic_file(path) as fh:
            fig.savefig(fh, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    return written


def write_comparison(root: Path, reference: str | None = None) -> dict:
    """``comparison.md``, ``comparison.json`` (the paired differences of every metric and
    round) and ``plots/`` from the cells' metrics and per-item outcomes; returns the collected
    data. ``reference``: as ``--reference`` (default: the comparison's, else RB-LoRA)."""
    from rblora.experiments.differences import paired_json, paired_rows, paired_table
    from rblora.utils.atomic import write_json, write_text

    data = collect(root)
    index = data["index"]
    reference = choose_reference(index["cells"], reference or index.get("reference"))
    ref_group = reference_group(list(data["groups"]), reference)
    rows = paired_rows(data, ref_group, replicate_label)
    data["reference"], data["paired"] = ref_group, rows
    spread = "replicates" if index.get("data_seeds") else "seeds"
    text = [
        "# Comparison",
        "",
        f"- train options: `{' '.join(shown_option(v) for v in index['base_argv'])}`",
        f"- {index['num_clients']} clients, {index['rounds']} round{'s' * (index['rounds'] > 1)}; "
        f"cells under {root}",
        replicates_line(index),
        f"- mean ± standard deviation over {spread}; r<t> = after round t",
        "",
        comparison_table(data),
    ]
    table = paired_table(rows, ref_group, index["rounds"])
    if table:
        text += ["", table]
    write_text(root / "comparison.md", "\n".join(text))
    write_json(root / PAIRED, paired_json(rows, ref_group), indent=1)
    write_plots(root, data)
    return data


def main(argv: list[str] | None = None) -> int:
    from rblora.aggregation import available_methods
    from rblora.experiments.differences import paired_table

    argv = list(sys.argv[1:] if argv is None else argv)
    own, train = split_passthrough(argv)
    parser = OptionParser(prog="rblora compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        default=",".join(available_methods()),
        help=f"comma-separated methods and/or {HEAD_ONLY} (default: every registered method)",
    )
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    parser.add_argument(
        "--rank_settings",
        default="heterogeneous",
        help="semicolon-separated: heterogeneous; smallest; uniform; name=r0,r1,... "
        "(name: a folder name of A-Za-z0-9_.-; default: heterogeneous)",
    )
    parser.add_argument(
        "--data_seeds",
        help="comma-separated partition seeds: one data folder per seed, prepared with the "
        "options of --data_path's folder (default: that folder alone)",
    )
    parser.add_argument(
        "--reference",
        help=f"the method the others are compared to item by item (default {DEFAULT_REFERENCE}, "
        "else the first method); method@setting picks one setting",
    )
    parser.add_argument("--output_dir", required=True, help="root of the cells and the table")
    parser.add_argument(
        "--retry_failed",
        action="store_true",
        help=f"run again the cells whose run stopped earlier (they hold {FAILED}); by default "
        "they are kept as failed",
    )
    try:
        ns = parser.parse_args(own)
        methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
        seeds = int_list(ns.seeds, "--seeds")
        if not seeds or min(seeds) < 0:
            raise ValueError(
                f"--seeds {ns.seeds!r}: give seeds >= 0 separated by commas, e.g. 1,2,3"
            )
        data_seeds = None
        if ns.data_seeds is not None:
            data_seeds = int_list(ns.data_seeds, "--data_seeds")
            if not data_seeds or min(data_seeds) < 0 or len(set(data_seeds)) < len(data_seeds):
                raise ValueError(
                    f"--data_seeds {ns.data_seeds!r}: give different seeds >= 0 separated by "
                    "commas, e.g. 1,2"
                )
        settings = [s.strip() for s in ns.rank_settings.split(";") if s.strip()]
        data = run_compare(
            train, methods, seeds, settings, Path(ns.output_dir), ns.retry_failed,
            data_seeds=data_seeds, reference=ns.reference,
        )  # fmt: skip
    except (ValueError, OSError) as err:
        print(f"rblora compare: error: {err}", file=sys.stderr)
        return 2
    print(comparison_table(data), end="")
    print(paired_table(data["paired"], data["reference"], data["index"]["rounds"]), end="")
    print(f"table: {Path(ns.output_dir) / 'comparison.md'}")
    return 0
