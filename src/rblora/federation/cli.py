"""``train.py`` / ``rblora train``: federated fine-tuning of a causal LM with heterogeneous ranks.

    python train.py --config configs/embedded.yaml
    python train.py --method "RB-LoRA" --global_model smollm2-135m-instruct --data_path ./data \
        --output_dir ./outputs/rb_lora --num_clients 10 --num_communication_rounds 3

Everything that can be checked before training is checked first (arguments, data folder, model,
ranks against the model's dimensions); a problem there is one message on stderr and exit code 2,
with nothing written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from rblora.federation.config import TrainArgs, parse_args

# options that must match when a run is resumed
_RESUME_KEYS = (
    "method",
    "reduction_method",
    "global_model",
    "data_path",
    "num_clients",
    "seed",
    "lora_alpha",
    "lora_target_modules",
    "use_rslora",
    "client_selection_strategy",
    "client_selection_frac",
    "local_num_epochs",
    "local_batch_size",
    "local_micro_batch_size",
    "local_learning_rate",
    "cutoff_len",
    "train_on_inputs",
    "group_by_length",
    "prompt_template_name",
    "local_val_set_size",
)


class UsageError(ValueError):
    """Bad input found before anything is written (exit code 2)."""


def main(argv: list[str] | None = None) -> int:
    from rblora.assets import AssetError

    try:
        args = parse_args(argv)
        return run(args)
    except (ValueError, AssetError, OSError) as err:
        # bad input found before anything is written, or a file system error (writes are
        # atomic, so nothing half-written is left either way)
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; continue the run with --resume", file=sys.stderr)
        return 130


def _check_run_dir(args: TrainArgs) -> None:
    run_dir = args.run_dir()
    has_run = run_dir.is_dir() and any(run_dir.iterdir())
    if has_run and not (args.resume or args.overwrite):
        raise UsageError(
            f"output folder {run_dir} already holds a run; pass --resume to continue it or "
            "--overwrite to replace it"
        )


def _check_resume_config(args: TrainArgs, saved: dict[str, Any]) -> None:
    current = args.to_dict()
    diffs = [
        f"{key}: run has {saved.get(key)!r}, now {current.get(key)!r}"
        for key in _RESUME_KEYS
        if saved.get(key) != current.get(key)
    ]
    if saved.get("client_ranks_resolved") != args.ranks():
        diffs.append(
            f"client ranks: run has {saved.get('client_ranks_resolved')}, now {args.ranks()}"
        )
    if diffs:
        raise UsageError("cannot resume with different options: " + "; ".join(diffs))


def _check_ranks(ranks: list[int], shapes: dict[str, tuple[int, int]]) -> None:
    limit_module, (d_out, d_in) = min(shapes.items(), key=lambda kv: min(kv[1]))
    limit = min(d_out, d_in)
    for k, r in enumerate(ranks):
        if r > limit:
            raise UsageError(
                f"client {k}: rank {r} is above {limit}, the smallest dimension of the adapted "
                f"module {limit_module} ({d_out}x{d_in}); valid ranks are 1..{limit} "
                "(set --client_ranks, e.g. 4,4,8,8,16,16,32,32,64,64)"
            )


def _eval_suites(args: TrainArgs, prompter, data) -> tuple[dict[str, list], list[dict]]:
    """Multiple-choice suites scored each round and the records of the held-out loss."""
    from rblora.evaluation import load_mc_file, mmlu_items

    suites: dict[str, list] = {}
    if args.dev_data_path:
        suites["dev"] = load_mc_file(args.dev_data_path, prompter)
    elif args.eval_mmlu_size > 0:
        suites["mmlu"] = mmlu_items(args.eval_mmlu_size, seed=args.seed, prompter=prompter)
    test_path = Path(args.data_path) / str(args.num_clients) / "global_test.json"
    test_items = load_mc_file(test_path, prompter)
    test_records = list(data.global_test)
    if args.eval_test_size:
        # a seeded subset: the file is ordered by category, a prefix would miss some of them
        test_items = _subset(test_items, args.eval_test_size, args.seed)
        test_records = _subset(test_records, args.eval_test_size, args.seed)
    if test_items:
        suites["test"] = test_items
    return suites, test_records


def _subset(values: list, size: int, seed: int) -> list:
    """At most ``size`` of ``values``, drawn with ``seed``, in their original order."""
    if len(values) <= size:
        return values
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).choice(len(values), size=size, replace=False))
    return [values[i] for i in keep]


def run(args: TrainArgs) -> int:
    from rblora.assets import load_causal_lm
    from rblora.data import load_federated_split
    from rblora.data.templates import Prompter
    from rblora.federation.lm import CausalLMTask
    from rblora.federation.loop import (
        LoopOptions,
        load_checkpoint,
        log,
        read_metrics,
        run_rounds,
        truncate_metrics,
    )
    from rblora.federation.report import markdown_table, write_report
    from rblora.federation.server import ClientSpec, FederatedServer
    from rblora.training import TrainConfig
    from rblora.utils.atomic import write_json

    _check_run_dir(args)
    ranks = args.ranks()
    run_dir = args.run_dir()
    prompter = Prompter(args.prompt_template_name)

    # -- everything checked before anything is written
    data = load_federated_split(Path(args.data_path), args.num_clients)
    expected = args.expected_sizes()
    if expected is not None:
        actual = [len(c) for c in data.clients]
        if actual != expected:
            raise UsageError(
                f"client_dataset_size_dict {expected} does not match the data folder's client "
                f"sizes {actual} ({Path(args.data_path) / str(args.num_clients)})"
            )
    if args.resume and (run_dir / "config.json").is_file():
        _check_resume_config(args, json.loads((run_dir / "config.json").read_text()))
    train_config = TrainConfig(
        micro_batch_size=args.local_micro_batch_size,
        batch_size=args.local_batch_size,
        num_epochs=args.local_num_epochs,
        learning_rate=args.local_learning_rate,
        group_by_length=args.group_by_length,
        cutoff_len=args.cutoff_len,
        train_on_inputs=args.train_on_inputs,
        bf16={"auto": "auto", "true": True, "false": False}[args.bf16],
        seed=args.seed,
    )
    log(f"loading {args.global_model}")
    model, tokenizer = load_causal_lm(args.global_model, token=args.hf_token())
    task = CausalLMTask(
        model,
        tokenizer,
        data.clients,
        prompter=prompter,
        train_config=train_config,
        target_modules=args.lora_target_modules,
        lora_dropout=args.lora_dropout,
        val_set_size=args.local_val_set_size,
        eval_batch_size=args.eval_batch_size,
        base_name=args.global_model,
        seed=args.seed,
        progress=args.progress,
    )
    _check_ranks(ranks, task.module_shapes())
    task.eval_suites, task.loss_records = _eval_suites(args, prompter, data)

    # -- from here on the run folder is written
    if args.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        **args.to_dict(),
        "client_ranks_resolved": ranks,
        "client_sizes": [task.num_examples(k) for k in range(args.num_clients)],
    }
    write_json(run_dir / "config.json", config)

    server = FederatedServer(
        args.method,
        [ClientSpec(k, r, args.lora_alpha, args.use_rslora) for k, r in enumerate(ranks)],
        reduction=args.reduction_method,
        selection=args.client_selection_strategy,
        frac=args.client_selection_frac,
        seed=args.seed,
    )
    if args.resume:
        meta = load_checkpoint(run_dir, server)
        if meta is None:
            log("nothing to resume: starting from round 1")
        else:
            for merged in server.merged:
                task.merge_into_base(merged)
            log(f"resuming after round {server.completed_rounds}")
        truncate_metrics(run_dir, server.completed_rounds)
    elif (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    log(
        f"{args.method} ({server.reduction or 'default'} redistribution), {args.num_clients} "
        f"clients, ranks {ranks}, sizes {config['client_sizes']}, "
        f"{args.num_communication_rounds} rounds"
    )
    options = LoopOptions(
        num_rounds=args.num_communication_rounds,
        seed=args.seed,
        save_client_adapters=args.save_client_adapters,
        progress=args.progress,
        eval_base=args.eval_base,
    )
    run_rounds(task, server, run_dir, options)
    results = write_report(run_dir, read_metrics(run_dir), config)
    print(markdown_table(results), end="")
    print(f"results: {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
