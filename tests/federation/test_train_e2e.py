"""train.py end to end on a tiny Llama saved to a folder and data prepared by prepare-data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from rblora.aggregation import ClientUpdate, aggregate
from rblora.data.prepare import main as prepare_main
from rblora.federation import cli
from rblora.federation.lm import CausalLMTask

CATEGORIES = ["open_qa", "brainstorming", "classification"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    dolly = root / "dolly.jsonl"
    with open(dolly, "w") as fh:
        for i in range(60):
            cat = CATEGORIES[i % 3]
            rec = {
                "instruction": f"Say {cat} {i}",
                "context": "" if i % 2 else f"ctx {i}",
                "response": f"{cat} answer {i % 7}",
                "category": cat,
            }
            fh.write(json.dumps(rec) + "\n")
    code = prepare_main(
        [
            "3",
            "2",
            "1",
            "--dolly",
            str(dolly),
            "--client_sizes",
            "8,12,16",
            "--test_per_category",
            "2",
            "--output_dir",
            str(root / "data"),
        ]
    )
    assert code == 0
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


def _argv(ws, out, *extra):
    options = {
        "global_model": ws / "model", "data_path": ws / "data", "output_dir": out,
        "num_clients": 3, "client_ranks": "2,4,8", "num_communication_rounds": 2,
        "local_num_epochs": 1, "local_batch_size": 4, "local_micro_batch_size": 2,
        "local_learning_rate": 1e-2, "cutoff_len": 160, "prompt_template_name": "alpaca_short",
        "dev_data_path": ws / "dev.json", "bf16": "false", "seed": 3,
    }  # fmt: skip
    argv = [part for key, value in options.items() for part in (f"--{key}", str(value))]
    return [*argv, "--no_progress", *extra]


def _tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["RB-LoRA", "FLoRA", "Weighted HETLoRA"])
def test_run_writes_everything(workspace, tmp_path, method, capsys):
    assert cli.main(_argv(workspace, tmp_path, "--method", method)) == 0
    run = tmp_path / "3"
    for name in (
        "config.json",
        "metrics.jsonl",
        "results.json",
        "summary.md",
        "plots/accuracy.png",
        "plots/loss.png",
        "checkpoint/state.json",
    ):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["type"] == "round"]
    clients = [r for r in records if r["type"] == "client"]
    assert [r["round"] for r in rounds] == [1, 2] and len(clients) == 6
    assert all(c["bytes_up"] > 0 and c["loss"] > 0 and c["tokens"] > 0 for c in clients)
    assert all(c["bytes_down"] == 0 for c in clients if c["round"] == 1)
    assert all(c["bytes_down"] > 0 for c in clients if c["round"] == 2)
    assert rounds[-1]["eval"]["suites"]["dev"]["count"] == 6
    assert rounds[-1]["eval"]["loss"] > 0
    results = json.loads((run / "results.json").read_text())
    assert results["rounds_completed"] == 2 and "dev/accuracy" in results["final"]
    assert "| round |" in capsys.readouterr().out

    # the global adapter is a PEFT folder that gives exactly the aggregate of the client adapters
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    updates = []
    for k, rank in enumerate([2, 4, 8]):
        cfg = json.loads((run / "round_1" / f"client_{k}" / "adapter_config.json").read_text())
        assert cfg["r"] == rank and cfg["lora_alpha"] == 16
        t = _tensors(run / "round_1" / f"client_{k}")
        factors = {}
        for key in t:
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                factors[module] = (t[key], t[key.replace("lora_A", "lora_B")])
        size = json.loads((run / "config.json").read_text())["client_sizes"][k]
        updates.append(ClientUpdate(num_examples=size, lora_alpha=16.0, factors=factors))
    expected = aggregate(method, updates)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    peft_model = PeftModel.from_pretrained(base, run / "round_1" / "global")
    for module in expected.modules:
        layer = peft_model.get_submodule("base_model.model." + module)
        torch.testing.assert_close(
            layer.get_delta_weight("default"), expected.delta(module), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("method", ["RB-LoRA", "FLoRA"])
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(
    workspace, tmp_path, method, monkeypatch
):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main(_argv(workspace, full, "--method", method)) == 0

    original = CausalLMTask.train_client
    calls = {"n": 0}

    def dies_in_round_2(self, spec, start, *, seed, round_):
        if round_ == 2:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return original(self, spec, start, seed=seed, round_=round_)

    monkeypatch.setattr(CausalLMTask, "train_client", dies_in_round_2)
    assert cli.main(_argv(workspace, cut, "--method", method)) == 130
    monkeypatch.setattr(CausalLMTask, "train_client", original)
    assert not (cut / "3" / "round_2" / "global").exists()
    assert cli.main(_argv(workspace, cut, "--method", method)) == 2  # refuses to overwrite
    assert cli.main(_argv(workspace, cut, "--method", method, "--resume")) == 0

    for sub in ["round_2/global", "round_2/client_0", "round_2/client_2"]:
        a, b = _tensors(full / "3" / sub), _tensors(cut / "3" / sub)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (sub, key)
    lines = (cut / "3" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines if '"type": "round"' in x] == [1, 2]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "FedNope"], "FedNope"),
        (["--client_ranks", "2,4,64"], "rank 64 is above"),
        (["--num_clients", "4", "--client_ranks", "2,2,2,2"], "no prepared data for 4"),
        (["--global_model", "nobody/no-such-model-xyz"], "no-such-model-xyz"),
        (["--global_model", "/"], "no config.json"),
        (["--lora_target_modules", "nope_proj"], "'nope_proj' matches no module"),
        (["--dev_data_path", "/nonexistent/dev.json"], "dev.json"),
        (
            ["--client_dataset_size_dict", '{"client_0": 1, "client_1": 2, "client_2": 3}'],
            "does not match",
        ),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(workspace, tmp_path, extra, fragment, capsys):
    out = tmp_path / "out"
    assert cli.main(_argv(workspace, out, *extra)) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not out.exists()


def test_malformed_client_file(workspace, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    (data / "3" / "local_training_1.json").write_text('[{"instruction": "x",')
    argv = _argv(workspace, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(data)
    assert cli.main(argv) == 2
    assert "local_training_1.json" in capsys.readouterr().err


def test_local_validation_split_is_reported(workspace, tmp_path):
    argv = _argv(
        workspace, tmp_path, "--local_val_set_size", "2", "--num_communication_rounds", "1"
    )
    assert cli.main(argv) == 0
    lines = (tmp_path / "3" / "metrics.jsonl").read_text().splitlines()
    clients = [json.loads(x) for x in lines if '"type": "client"' in x]
    sizes = json.loads((tmp_path / "3" / "config.json").read_text())["client_sizes"]
    assert sizes == [6, 10, 14]  # 8, 12, 16 minus the 2 held out per client
    assert all(0 < c["val_loss"] < 20 for c in clients)
    assert [c["num_examples"] for c in clients] == sizes


def test_base_model_evaluated_as_round_0(workspace, tmp_path):
    argv = _argv(workspace, tmp_path, "--eval_base", "--num_communication_rounds", "1")
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["eval"]["suites"]["dev"]["count"] == 6 and rounds[0]["eval"]["loss"] > 0
    assert rounds[0]["eval"]["loss"] != rounds[1]["eval"]["loss"]  # round 1 evaluates base + update
    results = json.loads((run / "results.json").read_text())
    assert results["rounds_completed"] == 1 and results["rounds"][0]["round"] == 0
    assert "| 0 | - |" in (run / "summary.md").read_text()
