"""The causal-language-model task: local training on instruction data, evaluation of the global
model by multiple-choice log-likelihood and held-out response loss.

One base model is held in memory for the whole run; each client wraps it in a LoRA of its own rank
(:class:`rblora.adapters.LoraHost`, which keeps PEFT's wrappers of each LoRA shape between
clients), trains, hands back its factors and unwraps it again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rblora.adapters import (
    BaseWeights,
    LoraHost,
    LoraSpec,
    applied_delta,
    keep_beside,
    resolve_targets,
    save_peft_adapter,
)
from rblora.aggregation.running import ModuleDelta
from rblora.aggregation.types import Factors
from rblora.data.templates import Prompter
from rblora.protocol.types import ClientResult, ClientSpec, ClientStart, UpdateLayout
from rblora.tasks.base import (
    cached,
    check_ranks,
    read_held_data,
    seeded_subset,
    train_config,
)
from rblora.training import TrainConfig, check_targets, tokenize_records, train_local
from rblora.training.batching import sequence_length
from rblora.training.loss import causal_lm_objective
from rblora.training.rank_pruning import RoundPruning
from rblora.utils.device import use_bf16

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_TARGETS = ["q_proj", "v_proj"]


class CausalLMTask:
    """Federated instruction tuning of a causal LM (see :class:`rblora.tasks.base.Task`).

    Args:
        model, tokenizer: the base model (held for the whole run) and its tokenizer.
        client_records: client id -> its training records ``{instruction, context, response}``,
            for the clients this process trains (all of them in-process, one on a Flower node,
            none on a Flower server).
        prompter: prompt template used for training and evaluation.
        train_config: local training options; its seed is replaced per client and round.
        target_modules, lora_dropout: LoRA placement and dropout.
        val_set_size: records held out of each client's data for a local validation loss.
        eval_suites: name -> multiple-choice items scored each round.
        loss_records: held-out records whose response loss/perplexity is reported each round.
        base_reference: recorded in saved adapters as ``base_model_name_or_path``.
    """

    modules_to_save: list[str] = []

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        client_records: dict[int, list[dict[str, Any]]],
        *,
        prompter: Prompter,
        train_config: TrainConfig,
        target_modules: list[str],
        lora_dropout: float,
        val_set_size: int = 0,
        eval_suites: dict[str, list] | None = None,
        loss_records: list[dict[str, Any]] | None = None,
        eval_batch_size: int = 32,
        base_reference: str = "",
        seed: int = 0,
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.train_config = train_config
        self.target_modules = list(target_modules)
        self.lora_dropout = lora_dropout
        self.eval_batch_size = eval_batch_size
        self.base_reference = base_reference
        self.progress = progress
        self._base = BaseWeights.of(model)
        self._lora = LoraHost.of(model)  # attaches clients' LoRAs without rebuilding PEFT
        # global updates stay beside the weights unless the model computes in float32
        self._merged = not keep_beside(model, use_bf16(train_config.bf16, model))
        self._loss_fn = causal_lm_objective(tokenizer.pad_token_id or 0)
        self._train: dict[int, list[dict]] = {}
        self._val: dict[int, list[dict]] = {}
        for k, records in sorted(client_records.items()):  # each client's split: its own seed
            train, val = _split_val(records, val_set_size, np.random.default_rng([seed, k]), k)
            self._train[k] = self._tokenize(train)
            check_targets(self._train[k], f"client {k}", train_config.cutoff_len)
            self._val[k] = val
        self._shapes = self._find_shapes()
        self.local_tests = None
        """``client -> its own held-out records`` ([] when it holds none out), read when asked
        (set by :meth:`from_args`; None: no client's held-out split is known)."""
        self.eval_suites: dict[str, list] = {}
        self.loss_records: list[dict[str, Any]] = []
        self.set_evaluation(eval_suites or {}, loss_records or [])

    @classmethod
    def from_args(
        cls,
        args,
        *,
        log=print,
        clients: list[int],
        evaluation: bool = True,
        models: dict | None = None,
    ) -> CausalLMTask:
        """Build the task of a run: the data of ``clients`` read and checked, model loaded on its
        device, ranks checked against the model, evaluation sets read and encoded when
        ``evaluation`` (so a problem shows before round 1). See ``rblora.tasks.build_task``."""
        from rblora.assets import load_causal_lm
        from rblora.assets.models import model_reference
        from rblora.data import (
            load_client_records,
            load_federated_split,
            load_local_test_records,
            load_test_records,
        )
        from rblora.utils.device import resolve_base_dtype, resolve_device

        prompter = Prompter(args.prompt_template_name)
        records, test = read_held_data(
            args, clients, evaluation,
            whole=load_federated_split, one=load_client_records, test=load_test_records,
        )  # fmt: skip
        device = resolve_device(args.device)
        dtype = resolve_base_dtype(args.base_dtype, device)
        name = args.global_model or DEFAULT_MODEL
        log(f"loading {name} on {device} in {str(dtype).removeprefix('torch.')}")
        model, tokenizer = cached(
            models,
            ("lm", name, str(device), str(dtype)),
            lambda: load_causal_lm(name, dtype=dtype, token=args.hf_token(), device=device),
        )
        config = train_config(
            args,
            model,
            log=log,
            group_by_length=args.group_by_length,
            split_by_length=args.split_by_length,
            cutoff_len=args.cutoff_len,
            train_on_inputs=args.train_on_inputs,
        )
        task = cls(
            model,
            tokenizer,
            records,
            prompter=prompter,
            train_config=config,
            target_modules=args.lora_target_modules or DEFAULT_TARGETS,
            lora_dropout=args.lora_dropout,
            val_set_size=args.local_val_set_size,
            eval_batch_size=args.eval_batch_size,
            base_reference=model_reference(name),
            seed=args.seed,
            progress=args.progress,
        )
        check_ranks(args.ranks(), task.module_shapes())
        path, count = args.data_path, args.num_clients
        task.local_tests = lambda k: load_local_test_records(path, count, k)
        if evaluation:
            task.set_evaluation(*_eval_sets(args, prompter, Path(args.data_path), test))
        return task

    def set_evaluation(self, suites: dict[str, list], loss_records: list[dict]) -> None:
        """Set the multiple-choice suites and held-out loss records scored each round; they are
        encoded once here, so a record the model cannot score fails now, not after round 1, and
        no round tokenizes them again."""
        from rblora.evaluation import EvalConfig, encode_evaluation
        from rblora.evaluation.multiple_choice import context_size

        self._evaluation = encode_evaluation(
            self.tokenizer,
            suites,
            loss_records,
            self.prompter,
            EvalConfig(cutoff_len=self.train_config.cutoff_len),
            context=context_size(self.model),
        )
        self.eval_suites, self.loss_records = dict(suites), list(loss_records)

    def _tokenize(self, records: list[dict[str, Any]]) -> list[dict]:
        c = self.train_config
        return tokenize_records(
            records, self.tokenizer, self.prompter, c.cutoff_len, c.train_on_inputs
        )

    def _find_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every module the LoRA will wrap, matched exactly as attach_lora does."""
        spec = LoraSpec(rank=1, target_modules=self.target_modules, dropout=self.lora_dropout)
        return {
            name: (d_out, d_in) for name, (d_in, d_out) in resolve_targets(self.model, spec).items()
        }

    # ------------------------------------------------------------------ Task protocol
    def num_examples(self, client_id: int) -> int:
        return len(self._client_data(self._train, client_id))

    def _client_data(self, data: dict[int, list], client_id: int) -> list:
        if client_id not in data:
            raise ValueError(
                f"client {client_id}'s data is not held here (this task holds clients "
                f"{sorted(data)})"
            )
        return data[client_id]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def update_layout(self) -> UpdateLayout:
        return UpdateLayout(modules=self.module_shapes())

    def lora_spec(self, spec: ClientSpec) -> LoraSpec:
        return LoraSpec(
            rank=spec.rank,
            lora_alpha=spec.lora_alpha,
            target_modules=self.target_modules,
            dropout=self.lora_dropout,
            use_rslora=spec.use_rslora,
        )

    def train_client(
        self, spec: ClientSpec, start: ClientStart, *, seed: int, round_: int
    ) -> ClientResult:
        examples = self._client_data(self._train, spec.client_id)
        peft_model = self._lora.attach(
            self.lora_spec(spec), init=start.factors, seed=seed, trains=start.trains
        )
        try:
            config = replace(self.train_config, seed=seed)
            pruning = RoundPruning.begin(peft_model, config.prune_lambda, config.prune_gamma)
            result = train_local(
                peft_model,
                examples,
                config,
                loss_fn=self._loss_fn,
                length=sequence_length,
                progress=self.progress,
                penalty=pruning.penalty if pruning else None,
            )
            factors = self._lora.read_factors()
            if pruning:
                factors = pruning.finish(peft_model, factors, spec.scale)
            metrics: dict[str, Any] = {
                "loss": result.loss,
                "steps": result.steps,
                "tokens": result.tokens,
                "seconds": round(result.seconds, 3),
            }
            if self._val[spec.client_id]:
                metrics["val_loss"] = self._heldout_loss(peft_model, self._val[spec.client_id])
        finally:
            self.model = self._lora.detach()
        return ClientResult(factors=factors, num_examples=len(examples), metrics=metrics)

    def set_base(self, delta: dict[str, ModuleDelta], dense: dict[str, torch.Tensor]) -> None:
        self._base.set(delta, merged=self._merged)

    def evaluate(self, delta: dict[str, ModuleDelta], *, round_: int) -> dict[str, Any]:
        from rblora.evaluation import EvalConfig, evaluate_encoded

        config = EvalConfig(
            batch_size=self.eval_batch_size,
            autocast_bf16=use_bf16(self.train_config.bf16, self.model),
            cutoff_len=self.train_config.cutoff_len,
            progress=self.progress,
        )
        with applied_delta(self.model, delta, merged=self._merged):
            return evaluate_encoded(self.model, self._evaluation, config, items=True)

    def evaluate_local(
        self, client_id: int, delta: dict[str, ModuleDelta], *, round_: int
    ) -> dict[str, Any] | None:
        """Metrics of the base + ``delta`` on client ``client_id``'s own held-out records
        (``local_test_<k>.json``), with the global evaluation's code: the multiple-choice
        records as the suite ``local``, all of them for the held-out loss; None when the client
        holds none out. ``"examples"``: the held-out records scored. Read and encoded when
        asked, never kept."""
        from rblora.evaluation import EvalConfig, encode_evaluation, evaluate_encoded
        from rblora.evaluation.items import mc_items
        from rblora.evaluation.multiple_choice import context_size

        self._client_data(self._train, client_id)  # this task holds the client, or ValueError
        if self.local_tests is None:
            raise ValueError("this task knows no client's held-out split (built without a folder)")
        records = self.local_tests(client_id)
        if not records:
            return None
        items = mc_items(records, self.prompter, f"local_test_{client_id}.json")
        encoded = encode_evaluation(
            self.tokenizer,
            {"local": items} if items else {},
            records,
            self.prompter,
            EvalConfig(cutoff_len=self.train_config.cutoff_len),
            context=context_size(self.model),
        )
        config = EvalConfig(
            batch_size=self.eval_batch_size,
            autocast_bf16=use_bf16(self.train_config.bf16, self.model),
            cutoff_len=self.train_config.cutoff_len,
            progress=False,
        )
        with applied_delta(self.model, delta, merged=self._merged):
            return {**evaluate_encoded(self.model, encoded, config), "examples": len(records)}

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
        save_peft_adapter(
            path,
            factors,
            rank=rank,
            lora_alpha=lora_alpha,
            target_modules=self.target_modules,
            use_rslora=use_rslora,
            base_model_name_or_path=self.base_reference,
        )

    # ------------------------------------------------------------------ helpers
    def _heldout_loss(self, model: torch.nn.Module, records: list[dict]) -> float:
        """Response loss of held-out records under ``model`` (the evaluation's definition)."""
        from rblora.evaluation import response_loss

        return response_loss(
            model,
            self.tokenizer,
            records,
            self.prompter,
            cutoff_len=self.train_config.cutoff_len,
            batch_size=self.eval_batch_size,
        )["loss"]


def _eval_sets(
    args, prompter: Prompter, data_path: Path, test: list[dict]
) -> tuple[dict[str, list], list[dict]]:
    """Multiple-choice suites scored each round and the records of the held-out loss
    (``test``: the records of the prepared folder's ``global_test.json``)."""
    from rblora.data.federated import resolve_folder
    from rblora.evaluation import load_mc_file, mmlu_items

    suites: dict[str, list] = {}
    if args.dev_data_path:
        suites["dev"] = load_mc_file(args.dev_data_path, prompter)
    elif args.eval_mmlu_size > 0:
        suites["mmlu"] = mmlu_items(args.eval_mmlu_size, seed=args.seed, prompter=prompter)
    test_path = resolve_folder(data_path, args.num_clients) / "global_test.json"
    test_items = seeded_subset(load_mc_file(test_path, prompter), args.eval_test_size, args.seed)
    if test_items:
        suites["test"] = test_items
    test_records = seeded_subset(list(test), args.eval_test_size, args.seed)
    return suites, test_records


def _split_val(
    records: list[dict[str, Any]], size: int, rng: np.random.Generator, client: int
) -> tuple[list[dict], list[dict]]:
    if size <= 0:
        return records, []
    if size >= len(records):
        raise ValueError(
            f"local_val_set_size {size} leaves client {client} no training data "
            f"(it has {len(records)} examples)"
        )
    order = rng.permutation(len(records))
    val = {int(i) for i in order[:size]}
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]
