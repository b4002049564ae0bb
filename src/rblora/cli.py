"""`rblora` command line: a small table from subcommand to the function that runs it.

Each entry names a module and a function taking the remaining arguments (``list[str]``) and
returning an exit code; the module is imported only when its subcommand runs, so
``rblora assets list`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("rblora.data.prepare:main", "partition a data source into federated clients"),
    "train": ("rblora.federation.cli:main", "federated training with heterogeneous LoRA ranks"),
    "evaluate": ("rblora.experiments.evaluate:main", "score a saved adapter"),
    "compare": ("rblora.experiments.compare:main", "methods x seeds x rank settings, one table"),
    "report": ("rblora.experiments.report:main", "rebuild tables and plots of runs"),
    "assets": ("rblora.assets.cli:main", "list or fetch the embedded models and data"),
    "configs": ("rblora.configs:main", "list the shipped train.py configs, or print one"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: rblora <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `rblora <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rblora: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
