"""The causal-language-model task: local training on instruction data, evaluation of the global
model by multiple-choice log-likelihood and held-out response loss.

One base model is held in memory for the whole run; each client wraps it in a LoRA of its own rank
(:func:`rblora.adapters.attach_lora`), trains, hands back its factors and unwraps it again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rblora.adapters import (
    LoraSpec,
    attach_lora,
    detach_lora,
    merge_into_base,
    read_factors,
    resolve_targets,
    save_peft_adapter,
)
from rblora.adapters.spec import Factors
from rblora.data.templates import Prompter
from rblora.federation.server import ClientSpec
from rblora.federation.task import ClientResult
from rblora.training import TrainConfig, tokenize_records, train_local
from rblora.training.batching import collate, count_targets
from rblora.training.loss import causal_lm_loss_sum


@contextlib.contextmanager
def applied_delta(model: torch.nn.Module, delta: Factors) -> Iterator[torch.nn.Module]:
    """Temporarily add ``delta`` (dW = B @ A per module) to the base weights.

    The touched weights are cloned first and copied back afterwards, so the base is bitwise
    unchanged when the block ends (subtracting the delta again would not be exact).
    """
    modules = dict(model.named_modules())
    saved = {name: modules[name].weight.detach().clone() for name in delta}
    try:
        merge_into_base(model, delta)
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)


class CausalLMTask:
    """Federated instruction tuning of a causal LM (see :class:`rblora.federation.task.Task`).

    Args:
        model, tokenizer: the base model (held for the whole run) and its tokenizer.
        client_records: per client, its training records ``{instruction, context, response}``.
        prompter: prompt template used for training and evaluation.
        train_config: local training options; its seed is replaced per client and round.
        target_modules, lora_dropout: LoRA placement and dropout.
        val_set_size: records held out of each client's data for a local validation loss.
        eval_suites: name -> multiple-choice items scored each round.
        loss_records: held-out records whose response loss/perplexity is reported each round.
        base_name: recorded in saved adapters as ``base_model_name_or_path``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        client_records: list[list[dict[str, Any]]],
        *,
        prompter: Prompter,
        train_config: TrainConfig,
        target_modules: list[str],
        lora_dropout: float,
        val_set_size: int = 0,
        eval_suites: dict[str, list] | None = None,
        loss_records: list[dict[str, Any]] | None = None,
        eval_batch_size: int = 32,
        base_name: str = "",
        seed: int = 0,
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.train_config = train_config
        self.target_modules = list(target_modules)
        self.lora_dropout = lora_dropout
        self.eval_suites = eval_suites or {}
        self.loss_records = loss_records or []
        self.eval_batch_size = eval_batch_size
        self.base_name = base_name
        self.progress = progress
        self._train: list[list[dict]] = []
        self._val: list[list[dict]] = []
        for k, records in enumerate(client_records):
            train, val = _split_val(records, val_set_size, np.random.default_rng([seed, k]), k)
            self._train.append(self._tokenize(train))
            self._val.append(self._tokenize(val))
        self._shapes = self._find_shapes()

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
        return len(self._train[client_id])

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def lora_spec(self, spec: ClientSpec) -> LoraSpec:
        return LoraSpec(
            rank=spec.rank,
            lora_alpha=spec.lora_alpha,
            target_modules=self.target_modules,
            dropout=self.lora_dropout,
            use_rslora=spec.use_rslora,
        )

    def train_client(
        self, spec: ClientSpec, start: Factors | None, *, seed: int, round_: int
    ) -> ClientResult:
        examples = self._train[spec.client_id]
        peft_model = attach_lora(self.model, self.lora_spec(spec), init=start, seed=seed)
        try:
            config = replace(self.train_config, seed=seed)
            result = train_local(peft_model, examples, config, progress=self.progress)
            factors = read_factors(peft_model)
            metrics: dict[str, Any] = {
                "loss": result.loss,
                "steps": result.steps,
                "tokens": result.tokens,
                "seconds": round(result.seconds, 3),
            }
            if self._val[spec.client_id]:
                metrics["val_loss"] = self._loss(peft_model, self._val[spec.client_id])
        finally:
            self.model = detach_lora(peft_model)
        return ClientResult(factors=factors, num_examples=len(examples), metrics=metrics)

    def evaluate(self, delta: Factors, *, round_: int) -> dict[str, Any]:
        from rblora.evaluation import EvalConfig, evaluate_round

        config = EvalConfig(
            batch_size=self.eval_batch_size,
            autocast_bf16=self.train_config.use_bf16(),
            cutoff_len=self.train_config.cutoff_len,
            progress=self.progress,
        )
        with applied_delta(self.model, delta):
            return evaluate_round(
                self.model,
                self.tokenizer,
                self.eval_suites,
                self.loss_records,
                self.prompter,
                config,
            )

    def merge_into_base(self, delta: Factors) -> None:
        merge_into_base(self.model, delta)

    def save_adapter(
        self, path: Path, factors: Factors, *, rank: int, lora_alpha: float, use_rslora: bool
    ) -> None:
        save_peft_adapter(
            path,
            factors,
            rank=rank,
            lora_alpha=lora_alpha,
            target_modules=self.target_modules,
            use_rslora=use_rslora,
            base_model_name_or_path=self.base_name,
        )

    # ------------------------------------------------------------------ helpers
    @torch.inference_mode()
    def _loss(self, model: torch.nn.Module, examples: list[dict]) -> float:
        """Token-mean loss of ``examples`` (tokenized, with labels) under ``model``."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.eval_batch_size):
            batch = examples[i : i + self.eval_batch_size]
            ids, mask, labels = collate(batch, self.tokenizer.pad_token_id)
            total += float(causal_lm_loss_sum(model, ids, mask, labels))
            count += sum(count_targets(e) for e in batch)
        model.train(was_training)
        return total / max(count, 1)


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
