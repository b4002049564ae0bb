"""A tiny language-model run folder for end-to-end tests: model, tokenizer and prepared data.

Import as ``from run_helpers import lm_workspace, lm_argv`` (``tests/`` is on pytest's
pythonpath); ``tests/federation/conftest.py`` wraps ``lm_workspace`` in a module fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from tiny_models import build_tiny_llama, build_tiny_tokenizer

CATEGORIES = ["open_qa", "brainstorming", "classification"]


def lm_workspace(root: Path) -> Path:
    """``root/model`` (a saved tiny Llama), ``root/data/3`` (3 clients of 8, 12, 16 records) and
    ``root/dev.json`` (6 questions in the FLoRA MMLU format)."""
    from rblora.data.prepare import main as prepare_main

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    dolly = write_dolly(root / "dolly.jsonl")
    argv = ["3", "2", "1", "--dolly", str(dolly), "--client_sizes", "8,12,16"]
    argv += ["--test_per_category", "2", "--output_dir", str(root / "data")]
    assert prepare_main(argv) == 0
    dev = [
        {
            "instruction": "Please answer the following multiple-choice question honestly.",
            "input": f"Question: pick {i} Options: A. one, B. two, C. three, D. four",
            "output": f"The answer is: {'ABCD'[i % 4]}. {['one', 'two', 'three', 'four'][i % 4]}",
            "class": ["math", "art"][i % 2],
        }
        for i in range(6)
    ]
    (root / "dev.json").write_text(json.dumps(dev))
    return root


def local_test_workspace(workspace: Path, root: Path) -> Path:
    """``root`` with :func:`lm_workspace`'s model and dev file (copied from ``workspace``) and a
    data folder of the same three clients whose clients each hold out a quarter of their
    records (``--local_test_frac 0.25``: 2, 3 and 4; 6, 9 and 12 left to train on), for
    ``--eval_personalized``."""
    import shutil

    from rblora.data.prepare import main as prepare_main

    shutil.copytree(workspace / "model", root / "model")
    shutil.copy(workspace / "dev.json", root / "dev.json")
    argv = ["3", "2", "1", "--dolly", str(write_dolly(root / "dolly.jsonl"))]
    argv += ["--client_sizes", "8,12,16", "--test_per_category", "2", "--local_test_frac", "0.25"]
    assert prepare_main([*argv, "--output_dir", str(root / "data")]) == 0
    return root


def write_dolly(path: Path, count: int = 60) -> Path:
    """``count`` Dolly-format records (JSON lines) over :data:`CATEGORIES` at ``path``."""
    with open(path, "w") as fh:
        for i in range(count):
            cat = CATEGORIES[i % 3]
            rec = {
                "instruction": f"Say {cat} {i}",
                "context": "" if i % 2 else f"ctx {i}",
                "response": f"{cat} answer {i % 7}",
                "category": cat,
            }
            fh.write(json.dumps(rec) + "\n")
    return path


def lm_argv(ws: Path, out: Path, *extra: str, **overrides) -> list[str]:
    """train.py arguments for a 2-round run of 3 clients (ranks 2, 4, 8) on ``ws``."""
    options = {
        "global_model": ws / "model", "data_path": ws / "data", "output_dir": out,
        "num_clients": 3, "client_ranks": "2,4,8", "num_communication_rounds": 2,
        "local_num_epochs": 1, "local_batch_size": 4, "local_micro_batch_size": 2,
        "local_learning_rate": 1e-2, "cutoff_len": 160, "prompt_template_name": "alpaca_short",
        "dev_data_path": ws / "dev.json", "bf16": "false", "seed": 3,
    }  # fmt: skip
    options.update(overrides)
    argv = [part for key, value in options.items() for part in (f"--{key}", str(value))]
    return [*argv, "--no_progress", *extra]


def adapter_tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_global_updates(run_a: Path, run_b: Path, rounds=(1, 2), rel: float = 1e-4):
    """The global folders of two runs hold the same update in every module (``B @ A``, whatever
    its factored form) and the same dense extras, to ``rel`` of their norm: what two engines
    that sum replies in arrival order share (float rounding, not bitwise)."""

    for t in rounds:
        a = adapter_tensors(run_a / f"round_{t}" / "global")
        b = adapter_tensors(run_b / f"round_{t}" / "global")
        assert a.keys() == b.keys()
        for key in a:
            if "lora_A" in key:
                other = key.replace("lora_A", "lora_B")
                x, y = a[other] @ a[key], b[other] @ b[key]
            elif "lora_B" in key:
                continue
            else:
                x, y = a[key], b[key]
            assert float((x - y).norm()) <= rel * max(float(x.norm()), 1e-12), (t, key)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars under ``folder``: tag -> [(step, value)], as TensorBoard shows them
    (events purged by a later file left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def spy_evaluated_logits(monkeypatch, probe) -> dict:
    """Record, per round, the logits on ``probe`` of the model each round evaluates (the
    language-model task's base with the round's delta applied); returns the round -> logits
    dict the run fills."""
    import torch

    from rblora.adapters import applied_delta
    from rblora.tasks.lm import CausalLMTask

    evaluated: dict = {}
    original = CausalLMTask.evaluate

    def spy(self, delta, *, round_):
        with applied_delta(self.model, delta), torch.no_grad():
            evaluated[round_] = self.model(probe).logits
        return original(self, delta, round_=round_)

    monkeypatch.setattr(CausalLMTask, "evaluate", spy)
    return evaluated


def killed_in_round_2(monkeypatch, argv: list[str]) -> int:
    """Run train.py with ``argv``, a KeyboardInterrupt raised as the second client of round 2
    starts training (a user's Ctrl-C mid-round); returns the exit code (130), the task
    restored."""
    from rblora.federation import cli
    from rblora.tasks.lm import CausalLMTask

    original = CausalLMTask.train_client
    calls = {"n": 0}

    def dies_in_round_2(self, spec, start, *, seed, round_):
        if round_ == 2:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return original(self, spec, start, seed=seed, round_=round_)

    monkeypatch.setattr(CausalLMTask, "train_client", dies_in_round_2)
    try:
        return cli.main(argv)
    finally:
        monkeypatch.setattr(CausalLMTask, "train_client", original)


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_refused_in_one_line(workspace: Path, out: Path, extra, fragment: str, capsys) -> None:
    """train.py on the tiny workspace with ``extra`` options exits 2 with exactly one
    ``train.py: error:`` line holding ``fragment``, no traceback, and writes nothing."""
    from rblora.federation import cli

    assert cli.main(lm_argv(workspace, out, *extra)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err
    assert not out.exists()
