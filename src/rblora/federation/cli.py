"""``train.py`` / ``rblora train``: federated fine-tuning with heterogeneous LoRA ranks.

    python train.py --config configs/embedded.yaml
    python train.py --method "RB-LoRA" --global_model smollm2-135m-instruct --data_path ./data \
        --output_dir ./outputs/rb_lora --num_clients 10 --num_communication_rounds 3
    python train.py --config configs/vit_embedded.yaml          # an image task

Everything that can be checked before training is checked first (options, the data folder, the
model, ranks against the model's dimensions, the evaluation sets, a resumed run's checkpoint);
a problem there is one message on stderr and exit code 2, with nothing written. A run that
cannot go on later (a client's training diverged) stops with one message and exit code 1.
"""

from __future__ import annotations

import shutil
import sys

from rblora.federation.options import TrainArgs, parse_args


def main(argv: list[str] | None = None) -> int:
    from rblora.assets import AssetError
    from rblora.federation.rounds import RunError

    argv = list(sys.argv[1:] if argv is None else argv)
    if _lists_methods(argv):
        return 0
    try:
        args, given = parse_args(argv)
        return run(args, given)
    except RunError as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, AssetError, OSError) as err:
        # bad input found before anything is written, or a file system error (writes are
        # atomic, so nothing half-written is left either way)
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; continue the run with --resume", file=sys.stderr)
        return 130


def _lists_methods(argv: list[str]) -> bool:
    """``--method list``: print the registered methods and their redistributions."""
    if "--method" not in argv or argv[argv.index("--method") + 1 :][:1] != ["list"]:
        return False
    from rblora.aggregation import available_methods, supported_reductions

    for name in available_methods():
        print(f"{name}: redistribution {' | '.join(supported_reductions(name))} (default first)")
    return True


def run(args: TrainArgs, given: set[str] | None = None) -> int:
    from rblora.data.federated import data_fingerprint
    from rblora.federation import rundir
    from rblora.federation.loop import LoopOptions, run_rounds
    from rblora.federation.report import markdown_table, write_report
    from rblora.federation.rounds import log
    from rblora.federation.server import ClientSpec, FederatedServer
    from rblora.tasks import build_task, infer_task

    if not args.progress:  # process-wide, so here in the entry point and nowhere else
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    folder = rundir.RunFolder(args.run_dir())
    if folder.holds_run() and not (args.resume or args.overwrite):
        raise ValueError(
            f"output folder {folder.path} already holds a run; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    ranks = args.ranks()
    fingerprint = data_fingerprint(args.data_path, args.num_clients)
    if args.resume:
        rundir.check_resume(folder, args, fingerprint)

    # -- everything checked before anything is written (the task loads and checks the rest)
    task = build_task(args, given, log=log)

    # -- from here on the run folder is written
    if args.overwrite and folder.path.exists():
        shutil.rmtree(folder.path)
    config = {
        **args.to_dict(),
        "task_resolved": infer_task(args),
        "client_ranks_resolved": ranks,
        "client_sizes": [task.num_examples(k) for k in range(args.num_clients)],
        "data_sha256": fingerprint,
        "base_model": task.base_reference,
    }
    if not args.resume:
        folder.write_config(config)
    server = FederatedServer(
        args.method,
        [ClientSpec(k, r, args.lora_alpha, args.use_rslora) for k, r in enumerate(ranks)],
        reduction=args.reduction_method,
        selection=args.client_selection_strategy,
        frac=args.client_selection_frac,
        seed=args.seed,
    )
    if args.resume:
        done = rundir.restore(folder, server, task)
        log(f"resuming after round {done}" if done else "nothing completed yet: from round 1")
    else:
        folder.clear_metrics()

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
    run_rounds(task, server, folder, options)
    results = write_report(folder.path, folder.read_metrics(), folder.read_config())
    print(markdown_table(results), end="")
    print(f"results: {folder.path / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
