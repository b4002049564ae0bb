"""The round loop serves any task: a two-layer MLP classifier with LoRA on its hidden layer and a
dense head, written here against the Task protocol alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from rblora.adapters import (
    BaseWeights,
    LoraSpec,
    applied_delta,
    attach_lora,
    detach_lora,
    read_dense,
    read_factors,
    save_peft_adapter,
    set_dense,
)
from rblora.federation.loop import LoopOptions, run_rounds
from rblora.federation.rundir import RunFolder
from rblora.federation.server import FederatedServer
from rblora.protocol.types import ClientResult, ClientSpec
from rblora.training import TrainConfig, train_local


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.hidden(x)))


@dataclass
class Blobs:
    x: torch.Tensor
    y: torch.Tensor


def blobs(n: int, seed: int, classes=(0, 1, 2)) -> Blobs:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return Blobs(centres[y] + torch.randn(n, 8, generator=g), y)


class MLPTask:
    modules_to_save = ["classifier"]
    base_reference = "mlp"

    def __init__(self, clients: list[Blobs], test: Blobs):
        torch.manual_seed(0)
        self.model = MLP()
        self.clients, self.test = clients, test
        self.base = BaseWeights(self.model)
        self.config = TrainConfig(micro_batch_size=8, batch_size=8, learning_rate=3e-2, bf16=False)

    def num_examples(self, client_id):
        return len(self.clients[client_id].y)

    def module_shapes(self):
        return {"hidden": (16, 8)}

    def train_client(self, spec, start, *, seed, round_):
        data = self.clients[spec.client_id]
        lora = LoraSpec(
            rank=spec.rank, lora_alpha=spec.lora_alpha, target_modules=["hidden"], dropout=0.0,
            modules_to_save=self.modules_to_save,
        )  # fmt: skip
        pm = attach_lora(self.model, lora, init=start.factors, dense=start.dense or None, seed=seed)

        def loss_fn(model, batch):
            idx = torch.tensor(batch)
            return F.cross_entropy(model(data.x[idx]), data.y[idx], reduction="sum"), len(batch)

        try:
            config = TrainConfig(**{**self.config.__dict__, "seed": seed})
            result = train_local(pm, list(range(len(data.y))), config, loss_fn=loss_fn)
            factors, dense = read_factors(pm), read_dense(pm, self.modules_to_save)
        finally:
            self.model = detach_lora(pm)
        return ClientResult(factors, len(data.y), dense=dense, metrics={"loss": result.loss})

    def set_base(self, delta, dense):
        self.base.set(delta)
        if dense:
            set_dense(self.model, dense)

    def evaluate(self, delta, *, round_):
        with applied_delta(self.model, delta), torch.no_grad():
            logits = self.model(self.test.x)
        accuracy = float((logits.argmax(-1) == self.test.y).float().mean())
        return {"suites": {"test": {"accuracy": accuracy}}, "logits": logits.tolist()}

    def save_adapter(self, path, factors, dense, *, rank, lora_alpha, use_rslora):
        save_peft_adapter(
            path, factors, rank=rank, lora_alpha=lora_alpha, target_modules=["hidden"],
            use_rslora=use_rslora, base_model_name_or_path=None, task_type=None, dense=dense,
            modules_to_save=self.modules_to_save,
        )  # fmt: skip


def test_the_loop_trains_a_non_language_task(tmp_path):
    # label skew: each client sees two of the three classes
    clients = [blobs(40, 1, (0, 1)), blobs(48, 2, (1, 2)), blobs(56, 3, (0, 2))]
    task = MLPTask(clients, blobs(90, 4))
    specs = [ClientSpec(k, r, 8.0) for k, r in enumerate([1, 2, 4])]
    server = FederatedServer("RB-LoRA", specs, selection="all", seed=0)
    folder = RunFolder(tmp_path)
    records = run_rounds(task, server, folder, LoopOptions(4, seed=0, progress=False))
    accuracy = [r["eval"]["suites"]["test"]["accuracy"] for r in records]
    assert accuracy[0] < 0.75 and accuracy[-1] > 0.9  # learned across the clients' label skew
    assert (tmp_path / "checkpoint" / "manifest.json").is_file()

    # the global folder reloads with PEFT onto a fresh MLP to the evaluated logits
    from peft import PeftModel

    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(MLP(), tmp_path / "round_4" / "global").eval()
    with torch.no_grad():
        got = reloaded(task.test.x)
    torch.testing.assert_close(got, torch.tensor(records[-1]["eval"]["logits"]), atol=1e-5, rtol=0)
    keys = load_file(str(tmp_path / "round_4" / "global" / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(keys)
