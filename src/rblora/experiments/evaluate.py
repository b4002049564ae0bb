"""``rblora evaluate``: score a saved adapter on the suites of the run it comes from.

    rblora evaluate --adapter outputs/embedded/10/round_3/global
    rblora evaluate --adapter outputs/embedded/10/round_1/client_4 --out scores.json
    rblora evaluate --adapter PATH -- --eval_mmlu_size 1444 --eval_test_size 0

``evaluate`` scores any adapter folder the runs write (a global model, a client's adapter, or a
head-only ``dense.safetensors``) on the suites of the run it comes from: its options are read
from the run's ``config.json`` (the first one found above the adapter, or ``--run``); options
after ``--`` override them. The adapter is applied to the original base model with each
module's own rank and scaling, as PEFT builds it from ``adapter_config.json`` (``lora_alpha / r``,
or the module's ``rank_pattern`` / ``alpha_pattern`` entries). A client adapter of a
merge-protocol run (FLoRA) was trained on the merged base of its round; it is scored on the
original base here.
"""

from __future__ import annotations

import sys
from pathlib import Path


def find_run(adapter: Path) -> Path:
    """The run folder (holding config.json) that ``adapter`` belongs to."""
    for folder in [adapter, *adapter.resolve().parents]:
        if (folder / "config.json").is_file() and (folder / "metrics.jsonl").exists():
            return folder
    raise ValueError(
        f"no run folder (config.json) above {adapter}; pass --run RUN_DIR or the options after --"
    )


def adapter_delta(path: Path) -> tuple[dict, dict]:
    """(module -> (A, s * B), dense extras) of a saved adapter folder; ValueError naming the
    file that is missing, truncated or unreadable."""
    from rblora.adapters import load_peft_dense
    from rblora.adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft_delta
    from rblora.tasks.image import DENSE_FILE
    from rblora.utils.files import read_safetensors

    if (path / DENSE_FILE).exists():
        return {}, read_safetensors(path / DENSE_FILE)
    if not any((path / name).exists() for name in (WEIGHTS_NAME, CONFIG_NAME)):
        raise ValueError(
            f"--adapter {path} holds no adapter: expected {WEIGHTS_NAME} and {CONFIG_NAME} "
            f"(LoRA) or {DENSE_FILE} (head only)"
        )
    return load_peft_delta(path), load_peft_dense(path)


def check_fits(adapter: Path, delta: dict, shapes: dict[str, tuple[int, int]], model: str) -> None:
    """Refuse an adapter that does not fit the model it is to be applied to (e.g. one trained on
    another base model, or ``--run`` of another run): ValueError naming the first module that
    does not fit, its shape in the adapter and in the model."""
    from rblora.aggregation.running import delta_shape

    for module, value in delta.items():
        have, want = delta_shape(value), shapes.get(module)
        if want is None:
            where = f"is not a module the model {model} adapts"
        elif have != want:
            where = f"is {have} (d_out, d_in) in the adapter but {want} in the model {model}"
        else:
            continue
        raise ValueError(
            f"adapter {adapter} does not fit: module {module} {where}; evaluate it with the run "
            "that trained it (--run RUN_DIR) or its model (-- --global_model ...)"
        )


def run_args(config: dict, extra: list[str]):
    """(TrainArgs, given) of a run's saved configuration with ``extra`` train.py options on top."""
    from dataclasses import fields

    from rblora.federation.options import TrainArgs, parse_args

    overrides, given = parse_args(extra)
    values = {f.name: config[f.name] for f in fields(TrainArgs) if f.name in config}
    values.update({name: getattr(overrides, name) for name in given})
    values.update(resume=False, overwrite=False)
    args = TrainArgs(**values)
    args.validate()
    return args, given


def main(argv: list[str] | None = None) -> int:
    from rblora.utils.options import OptionParser, split_passthrough

    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_passthrough(argv)
    parser = OptionParser(prog="rblora evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="an adapter folder a run wrote")
    parser.add_argument("--run", help="the run folder whose options to use (default: found)")
    parser.add_argument("--out", help="also write the evaluation as JSON to this file")
    try:
        ns = parser.parse_args(own)
    except ValueError as err:
        print(f"rblora evaluate: error: {err}", file=sys.stderr)
        return 2
    from rblora.assets import AssetError
    from rblora.federation.results import scalar_evals
    from rblora.federation.rounds import log
    from rblora.federation.setup import precision_args
    from rblora.tasks import build_task
    from rblora.utils.atomic import write_json
    from rblora.utils.records import read_json

    try:
        adapter = Path(ns.adapter)
        if not adapter.is_dir():
            raise ValueError(f"--adapter {adapter} is not a folder")
        run = Path(ns.run) if ns.run else find_run(adapter)
        config = read_json(run / "config.json")
        if not isinstance(config, dict):
            raise ValueError(f"{run / 'config.json'}: expected a JSON object of train.py options")
        args, given = run_args(config, extra)
        delta, dense = adapter_delta(adapter)
        # the test set and the model only (no client's data), in the run's recorded precision
        task = build_task(precision_args(args, config.get("precision")), given, log=log, clients=[])
        check_fits(adapter, delta, task.module_shapes(), args.global_model or "of the run")
        task.set_base({}, dense)
        evaluation = task.evaluate(delta, round_=-1)
    except (ValueError, AssetError, OSError) as err:
        print(f"rblora evaluate: error: {err}", file=sys.stderr)
        return 2
    for name, value in scalar_evals(evaluation).items():
        print(f"{name}: {value:.4f}")
    if ns.out:
        write_json(Path(ns.out), {"adapter": str(adapter), "eval": evaluation})
    return 0
