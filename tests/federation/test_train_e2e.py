"""train.py end to end on a tiny Llama saved to a folder and data prepared by prepare-data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_helpers import adapter_tensors, killed_in_round_2, lm_argv, metrics, spy_evaluated_logits

from rblora.aggregation import ClientUpdate, aggregate
from rblora.federation import cli


@pytest.mark.parametrize("method", ["RB-LoRA", "FLoRA", "Weighted HETLoRA"])
def test_run_writes_everything(workspace, tmp_path, method, capsys):
    assert cli.main(lm_argv(workspace, tmp_path, "--method", method)) == 0
    run = tmp_path / "3"
    for name in (
        "config.json",
        "metrics.jsonl",
        "results.json",
        "summary.md",
        "plots/accuracy.png",
        "plots/loss.png",
        "checkpoint/state.json",
        "checkpoint/manifest.json",
    ):
        assert (run / name).is_file(), name
    records = metrics(run)
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

    # round 1's global adapter, read back, is exactly the aggregate of the saved client adapters
    from rblora.adapters import load_peft_adapter

    updates = []
    for k in range(3):
        factors, cfg = load_peft_adapter(run / "round_1" / f"client_{k}")
        assert cfg["r"] == [2, 4, 8][k] and cfg["lora_alpha"] == 16
        size = json.loads((run / "config.json").read_text())["client_sizes"][k]
        updates.append(ClientUpdate(num_examples=size, lora_alpha=16.0, factors=factors))
    expected = aggregate(method, updates)
    glob, cfg = load_peft_adapter(run / "round_1" / "global")
    assert cfg["lora_alpha"] == cfg["r"]  # scale 1: B @ A is the update
    for module in expected.modules:
        a, b = glob[module]
        torch.testing.assert_close(b @ a, expected.delta(module), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "method, reduction",
    [
        ("FLoRA", "merge"),
        ("FLoRA", "svd"),
        ("RB-LoRA", "svd"),
        ("Weighted HETLoRA", "truncate"),
        ("Uniform HETLoRA", "merge"),
    ],
)
def test_global_folder_reloads_to_the_evaluated_model(
    workspace, tmp_path, method, reduction, monkeypatch
):
    """Every round's global folder, loaded with PeftModel on the ORIGINAL base and with
    AutoPeftModelForCausalLM (its base_model_name_or_path is the tiny model's folder), gives the
    logits of the model that round evaluated (for merge: base + every merged round, not only the
    last). Each module is stored at its own rank, without zero padding: a merged total that went
    dense (v_proj 16x32 in round 1, q_proj 32x32 in round 2 under FLoRA) as an identity factor
    on its smaller side and the dense total on the other, a factored one at its rank."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from rblora.adapters import load_peft_adapter

    probe = torch.tensor([[5, 17, 33, 40, 8, 61, 12]])
    evaluated = spy_evaluated_logits(monkeypatch, probe)
    argv = lm_argv(workspace, tmp_path, "--method", method, "--reduction_method", reduction)
    assert cli.main([*argv, "--num_communication_rounds", "3"]) == 0
    run = tmp_path / "3"
    stored = {}
    for t in (1, 2, 3):
        folder = run / f"round_{t}" / "global"
        base = AutoModelForCausalLM.from_pretrained(workspace / "model")
        for reloaded in (
            PeftModel.from_pretrained(base, folder),
            AutoPeftModelForCausalLM.from_pretrained(folder),
        ):
            with torch.no_grad():
                logits = reloaded.eval()(probe).logits
            torch.testing.assert_close(logits, evaluated[t], rtol=1e-4, atol=1e-4)
        factors, _ = load_peft_adapter(folder)
        for name, (a, b) in factors.items():
            assert a.shape[0] <= min(b.shape[0], a.shape[1]), (t, name)
            assert (a.abs().sum(1) > 0).all() and (b.abs().sum(0) > 0).all(), (t, name)  # no pad
        stored[t] = {
            kind: sorted({a.shape[0] for n, (a, _) in factors.items() if n.endswith(kind)})
            for kind in ("q_proj", "v_proj")
        }
    assert not torch.allclose(evaluated[1], evaluated[3], atol=1e-3)  # the rounds did something
    if (method, reduction) == ("FLoRA", "merge"):  # 14 components a round (ranks 2 + 4 + 8)
        assert stored == {
            1: {"q_proj": [14], "v_proj": [16]},  # v: dense (14 * 48 >= 16 * 32): I on d_out
            2: {"q_proj": [32], "v_proj": [16]},  # q: dense (28 * 64 >= 32 * 32): I on d_in
            3: {"q_proj": [32], "v_proj": [16]},
        }


def test_merge_checkpoint_does_not_grow(workspace, tmp_path, monkeypatch):
    """FLoRA keeps one running total per module, dense once that is smaller: the checkpoint of
    round 5 is no larger than round 2's, and at most 10% above round 1's (q_proj turns dense)."""
    from rblora.federation.rundir import RunFolder

    sizes = []
    original = RunFolder.save_checkpoint

    def measure(self, tensors, meta):
        original(self, tensors, meta)
        sizes.append((self.path / "checkpoint" / "server.safetensors").stat().st_size)

    monkeypatch.setattr(RunFolder, "save_checkpoint", measure)
    argv = lm_argv(workspace, tmp_path, "--method", "FLoRA", num_communication_rounds=5)
    assert cli.main(argv) == 0
    assert len(sizes) == 5
    assert sizes[1] == sizes[2] == sizes[3] == sizes[4] <= 1.1 * sizes[0]


def test_merge_download_bytes_under_partial_participation(workspace, tmp_path):
    """At frac 0.5 a FLoRA client downloads every merge it missed, not only the last one."""
    argv = lm_argv(
        workspace, tmp_path, "--method", "FLoRA", "--client_selection_frac", "0.5",
        num_communication_rounds=5,
    )  # fmt: skip
    assert cli.main(argv) == 0
    records = metrics(tmp_path / "3")
    rounds = {r["round"]: r for r in records if r["type"] == "round"}
    ranks = [2, 4, 8]
    # tiny Llama: q_proj 32x32, v_proj 16x32 (two layers each); a merge has the width of the
    # selected clients' ranks; a client needs every merge since it last trained, each module at
    # most one dense matrix
    shapes = [(32, 32), (16, 32)] * 2
    have = {k: 0 for k in range(3)}
    checked_backlog = False
    for r in (x for x in records if x["type"] == "client"):
        k, t = r["client"], r["round"]
        width = sum(sum(ranks[j] for j in rounds[s]["selected"]) for s in range(have[k] + 1, t))
        want = sum(min(width * (o + i), o * i) for o, i in shapes) * 4
        assert r["bytes_down"] == want, (k, t)
        checked_backlog |= t - 1 - have[k] >= 2
        have[k] = t - 1
    assert checked_backlog  # some client skipped at least one round and caught up


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(workspace, tmp_path, monkeypatch):
    """svd (RB-LoRA), truncate (Weighted HETLoRA) and merge (FLoRA) redistribution; the resume
    hashes and reads the checkpoint once (rundir.check_resume hands it to setup.restore)."""
    from rblora.federation import rundir

    for method in ("RB-LoRA", "Weighted HETLoRA", "FLoRA"):
        full, cut = tmp_path / method / "full", tmp_path / method / "cut"
        assert cli.main(lm_argv(workspace, full, "--method", method)) == 0

        assert killed_in_round_2(monkeypatch, lm_argv(workspace, cut, "--method", method)) == 130
        assert not (cut / "3" / "round_2" / "global").exists()
        assert cli.main(lm_argv(workspace, cut, "--method", method)) == 2  # no overwrite
        reads = []
        for name in ("sha256_file", "load_file"):
            real = getattr(rundir, name)

            def spy(path, *args, real=real, name=name, reads=reads):
                if Path(path).parent.name == rundir.CHECKPOINT:  # not the one being written
                    reads.append((name, Path(path).name))
                return real(path, *args)

            monkeypatch.setattr(rundir, name, spy)
        assert cli.main(lm_argv(workspace, cut, "--method", method, "--resume")) == 0
        monkeypatch.undo()
        assert sorted(reads) == [
            ("load_file", "server.safetensors"),
            ("sha256_file", "server.safetensors"),
            ("sha256_file", "state.json"),
        ]

        for sub in ["round_2/global", "round_2/client_0", "round_2/client_2"]:
            a, b = adapter_tensors(full / "3" / sub), adapter_tensors(cut / "3" / sub)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (method, sub, key)
        rounds = [r["round"] for r in metrics(cut / "3") if r["type"] == "round"]
        assert rounds == [1, 2]


def test_local_validation_split_is_reported(workspace, tmp_path):
    argv = lm_argv(workspace, tmp_path, "--local_val_set_size", "2", num_communication_rounds=1)
    assert cli.main(argv) == 0
    clients = [r for r in metrics(tmp_path / "3") if r["type"] == "client"]
    sizes = json.loads((tmp_path / "3" / "config.json").read_text())["client_sizes"]
    assert sizes == [6, 10, 14]  # 8, 12, 16 minus the 2 held out per client
    assert all(0 < c["val_loss"] < 20 for c in clients)
    assert [c["num_examples"] for c in clients] == sizes


def test_base_model_evaluated_as_round_0(workspace, tmp_path):
    argv = lm_argv(workspace, tmp_path, "--eval_base", num_communication_rounds=1)
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    rounds = [r for r in metrics(run) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["eval"]["suites"]["dev"]["count"] == 6 and rounds[0]["eval"]["loss"] > 0
    assert rounds[0]["eval"]["loss"] != rounds[1]["eval"]["loss"]  # round 1 evaluates base + update
    results = json.loads((run / "results.json").read_text())
    assert results["rounds_completed"] == 1 and results["rounds"][0]["round"] == 0
    assert "| 0 | - |" in (run / "summary.md").read_text()


def test_method_list(capsys):
    assert cli.main(["--method", "list"]) == 0
    out = capsys.readouterr().out
    assert "RB-LoRA: redistribution svd" in out and "FLoRA: redistribution merge" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_one_round_on_cuda(workspace, tmp_path):
    argv = lm_argv(workspace, tmp_path, "--device", "cuda", num_communication_rounds=1)
    assert cli.main(argv) == 0
    rounds = [r for r in metrics(tmp_path / "3") if r["type"] == "round"]
    assert rounds[0]["eval"]["loss"] > 0


def test_resume_computes_in_the_recorded_precision(workspace, tmp_path, monkeypatch, capsys):
    """bf16=auto is decided once, at the start, and recorded with the thread count; a resumed
    run uses the recorded decision whatever a timing says now, and warns about other threads."""
    from rblora.utils import device
    from rblora.utils.device import PrecisionChoice

    def timing(use_bf16):
        return lambda dev, width: PrecisionChoice(use_bf16, dev, width, 100.0, 300.0)

    argv = lm_argv(workspace, tmp_path, num_communication_rounds=1, bf16="auto")
    monkeypatch.setattr(device, "_measure", timing(False))
    assert cli.main(argv) == 0
    config = json.loads((tmp_path / "3" / "config.json").read_text())
    assert config["bf16"] == "auto"
    assert config["precision"] == {"bf16": False, "threads": torch.get_num_threads()}
    monkeypatch.setattr(device, "_measure", timing(True))  # this machine would now pick bf16
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    capsys.readouterr()
    try:
        resumed = lm_argv(workspace, tmp_path, num_communication_rounds=2, bf16="auto")
        assert cli.main([*resumed, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "precision: bf16 autocast" not in err  # nothing measured: the recorded fp32 is used
    assert f"the run started with {threads} torch threads" in err
