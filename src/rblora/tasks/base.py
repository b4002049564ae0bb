"""What the round core needs from a task, and how a run picks its task.

The round loop is written once; a task supplies local training, evaluation of a global model,
the base weights of the global model, and adapter export. Everything model-specific lives behind
:class:`Task`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rblora.aggregation.running import ModuleDelta
from rblora.aggregation.types import Factors
from rblora.protocol.types import ClientResult, ClientSpec, ClientStart, UpdateLayout

if TYPE_CHECKING:
    import torch

    from rblora.federation.options import TrainArgs
    from rblora.training import TrainConfig

TASK_MODULES = {"lm": "rblora.tasks.lm:CausalLMTask", "image": "rblora.tasks.image:ImageTask"}
"""Task name -> the class that builds it (``Class.from_args(args, log=, clients=, evaluation=,
models=)``)."""

_IMAGE_MODELS = ("dinov2-vits14",)


class Task(Protocol):
    """A federated fine-tuning task over one base model held in memory.

    Attributes:
        modules_to_save: modules trained in full beside the LoRA (PEFT's ``modules_to_save``);
            their parameters travel as dense extras and are averaged by examples.
        base_reference: what saved adapters record as ``base_model_name_or_path`` (a folder or
            hub id that loads on this machine).
    """

    modules_to_save: list[str]
    base_reference: str
    train_config: TrainConfig
    """Local training settings, ``bf16`` resolved (True/False) for this task's model."""

    def num_examples(self, client_id: int) -> int:
        """Training examples of a client this task holds (its aggregation weight); ValueError
        for a client whose data this process does not hold."""

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Adapted module name -> (d_out, d_in)."""

    def update_layout(self) -> UpdateLayout:
        """What every client's update holds (the server checks each reply against it)."""

    def train_client(
        self, spec: ClientSpec, start: ClientStart, *, seed: int, round_: int
    ) -> ClientResult:
        """Train a rank-``spec.rank`` LoRA from ``start.factors`` (None: fresh) and the dense
        extras from ``start.dense`` ({}: the base's) on the client's data."""

    def set_base(self, delta: dict[str, ModuleDelta], dense: dict[str, torch.Tensor]) -> None:
        """Make the base weights ``W0 + delta`` (original weights where absent) and the dense
        extras ``dense`` (unchanged where empty), for good."""

    def evaluate(self, delta: dict[str, ModuleDelta], *, round_: int) -> dict[str, Any]:
        """Metrics of the base + ``delta`` (factors with the scale folded in, or dense), and
        under ``"items"`` each suite's per-item outcomes (`rblora.evaluation.outcomes`), which
        the run folder keeps apart from the metrics (``rounds.keep_item_outcomes``)."""

    def evaluate_local(
        self, client_id: int, delta: dict[str, ModuleDelta], *, round_: int
    ) -> dict[str, Any] | None:
        """Metrics of the base + ``delta`` on the held-out split of client ``client_id``'s own
        data (``--eval_personalized``), with the code of :meth:`evaluate`, the suite named
        ``local``, and under ``"examples"`` how many held-out examples were scored; None when
        the client holds nothing out. ValueError for a client whose data this process does not
        hold."""

    def save_adapter(
        self,
        path: Path,
        factors: Factors,
        dense: dict[str, torch.Tensor],
        *,
        rank: int,
        lora_alpha: float,
        use_rslora: bool,
    ) -> None:
        """Write a PEFT adapter folder loadable on this task's base model."""


def infer_task(args: TrainArgs) -> str:
    """``args.task``, else the data folder's kind (images -> image), else the model's."""
    if args.task:
        return args.task
    folder = Path(args.data_path)
    for candidate in (folder / str(args.num_clients) / "partition.json", folder / "partition.json"):
        if candidate.is_file():
            try:
                kind = json.loads(candidate.read_text()).get("kind", "text")
            except (OSError, ValueError, AttributeError):
                break  # the data loader reports a damaged file with its name
            return "image" if kind == "images" else "lm"
    return "image" if args.global_model in _IMAGE_MODELS else "lm"


def build_task(
    args: TrainArgs,
    given: set[str] | None = None,
    *,
    log=print,
    clients: Sequence[int] | None = None,
    evaluation: bool = True,
    models: dict | None = None,
) -> Task:
    """The run's task, built from its options (model loaded, data read and checked).

    What the task holds (DESIGN.md section 6): ``clients`` are the clients whose training data
    it reads and trains (None: every client, as the in-process engine does; ``[k]``: a Flower
    node's own client; ``[]``: a Flower server, which trains nobody); ``evaluation``: whether it
    reads the evaluation sets (the test set is the server's, never a node's). ``models``: a
    cache the caller owns of loaded base models, shared by the tasks built with it (a ClientApp
    process serving several clients loads its model once).
    """
    name = infer_task(args)
    args.check_task_options(name, given or set())
    held = list(range(args.num_clients)) if clients is None else [int(k) for k in clients]
    for k in held:
        if not 0 <= k < args.num_clients:
            raise ValueError(f"client {k} is out of range: valid are 0..{args.num_clients - 1}")
    if getattr(args, "eval_personalized", False):  # refused now, not after round 1
        from rblora.data.federated import check_local_tests

        check_local_tests(args.data_path, args.num_clients, held)
    module, cls = TASK_MODULES[name].split(":")
    task_cls = getattr(importlib.import_module(module), cls)
    return task_cls.from_args(args, log=log, clients=held, evaluation=evaluation, models=models)


def cached(models: dict | None, key: tuple, load):
    """``load()``, or its earlier result for ``key`` in ``models`` (None: no cache)."""
    if models is None:
        return load()
    if key not in models:
        models[key] = load()
    return models[key]


def check_ranks(ranks: list[int], shapes: dict[str, tuple[int, int]]) -> None:
    """Every client's rank fits every adapted module (``rank <= min(d_out, d_in)``)."""
    limit_module, (d_out, d_in) = min(shapes.items(), key=lambda kv: min(kv[1]))
    limit = min(d_out, d_in)
    for k, r in enumerate(ranks):
        if r > limit:
            raise ValueError(
                f"client {k}: rank {r} is above {limit}, the smallest dimension of the adapted "
                f"module {limit_module} ({d_out}x{d_in}); valid ranks are 1..{limit} "
                "(set --client_ranks, e.g. 4,4,8,8,16,16,32,32,64,64)"
            )


def read_held_data(args: TrainArgs, clients: list[int], evaluation: bool, *, whole, one, test):
    """``(client -> its data, the test set or None)`` for what a task holds: the whole prepared
    folder read and checked as one (``whole(path, K)``, returning ``.clients`` and
    ``.global_test``) when it holds every client and the test set (in-process), else each held
    client's file alone (``one(path, K, k)``, a Flower node) and the test set alone
    (``test(path, K)``, a Flower server). Checks ``client_dataset_size_dict``."""
    path, count = Path(args.data_path), args.num_clients
    if evaluation and clients == list(range(count)):
        data = whole(path, count)
        held, held_test = dict(enumerate(data.clients)), data.global_test
    else:
        held = {k: one(path, count, k) for k in clients}
        held_test = test(path, count) if evaluation else None
    check_client_sizes(args, {k: len(v) for k, v in held.items()})
    return held, held_test


def check_client_sizes(args: TrainArgs, sizes: dict[int, int]) -> None:
    """Each held client's size (client -> examples in its file) matches
    ``client_dataset_size_dict`` when it is given."""
    expected = args.expected_sizes()
    if expected is None:
        return
    wrong = {k: (n, expected[k]) for k, n in sorted(sizes.items()) if n != expected[k]}
    if wrong:
        detail = ", ".join(
            f"client {k}: {n} in the folder, {e} expected" for k, (n, e) in wrong.items()
        )
        raise ValueError(
            f"client_dataset_size_dict does not match the data folder "
            f"({Path(args.data_path) / str(args.num_clients)}): {detail}"
        )


def seeded_subset(values: list, size: int, seed: int) -> list:
    """At most ``size`` of ``values``, drawn with ``seed``, in their original order (a test file
    ordered by category would lose whole categories to a prefix)."""
    if not size or len(values) <= size:
        return values
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).choice(len(values), size=size, replace=False))
    return [values[i] for i in keep]


def train_config(args: TrainArgs, model, *, log=print, **task_fields):
    """The local-training settings every task shares, from the run's options, with ``bf16``
    resolved for ``model`` (timed once per process, the decision logged); ``task_fields`` are
    the task's own (cutoff, masking, length grouping for language models)."""
    from dataclasses import replace

    from rblora.training import TrainConfig
    from rblora.utils.device import bf16_decision

    config = TrainConfig(
        micro_batch_size=args.local_micro_batch_size,
        batch_size=args.local_batch_size,
        num_epochs=args.local_num_epochs,
        learning_rate=args.local_learning_rate,
        bf16=args.bf16_setting(),
        seed=args.seed,
        prune_lambda=getattr(args, "hetlora_lambda", 0.0),
        prune_gamma=getattr(args, "hetlora_prune_gamma", 0.5),
        **task_fields,
    )
    choice = bf16_decision(config.bf16, model)
    if choice is None:
        return config
    log(choice.describe())
    return replace(config, bf16=choice.use_bf16)
