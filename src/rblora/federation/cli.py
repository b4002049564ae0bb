"""``train.py`` / ``rblora train``: federated fine-tuning with heterogeneous LoRA ranks.

    python train.py --config configs/embedded.yaml
    python train.py --method "RB-LoRA" --global_model smollm2-135m-instruct --data_path ./data \
        --output_dir ./outputs/rb_lora --num_clients 10 --num_communication_rounds 3
    python train.py --config configs/vit_embedded.yaml          # an image task

Everything that can be checked before training is checked first (options, the data folder, the
model, ranks against the model's dimensions, the evaluation sets, a resumed run's checkpoint, the
output folder not in use by another run); a problem there is one message on stderr and exit code
2, with nothing written. A run that cannot go on later (a client's training diverged, or any
error once the run folder holds this run's files) stops with one message and exit code 1.
"""

from __future__ import annotations

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
        run(args, given)
        return 0
    except RunError as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, AssetError, OSError) as err:
        # bad input found before anything is written (``setup.open_run`` turns these errors
        # into a RunError once the run folder holds the run's files)
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


def run(args: TrainArgs, given: set[str] | None = None) -> dict:
    """Run ``args`` on its engine (``--engine``); returns the run's results."""
    from rblora.federation.engines import get_engine

    if not args.progress:  # process-wide, so here in the entry point and nowhere else
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return get_engine(args.engine)(args, set(given or ()))


if __name__ == "__main__":
    sys.exit(main())
