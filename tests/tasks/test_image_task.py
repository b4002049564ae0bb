"""The image task end to end on a tiny ViT and the packaged digits (no download)."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import metrics
from safetensors.torch import load_file
from tiny_models import build_tiny_vit

from rblora.aggregation import available_methods, default_reduction, get_method
from rblora.data.prepare import main as prepare_main
from rblora.federation import cli

RANKS = [2, 4, 8]


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    build_tiny_vit(root / "vit")
    argv = ["3", "--source", "digits", "--partition", "dirichlet", "--alpha", "0.5"]
    argv += ["--min_size", "20", "--pool_size", "240", "--test_per_category", "6"]
    assert prepare_main([*argv, "--output_dir", str(root / "data")]) == 0
    local = [*argv, "--local_test_frac", "0.2", "--output_dir", str(root / "local")]
    assert prepare_main(local) == 0  # for a method without a global model (FedSA-LoRA)
    return root


def _argv(root, out, *extra):
    options = {
        "global_model": root / "vit", "data_path": root / "data", "output_dir": out,
        "num_clients": 3, "client_ranks": ",".join(map(str, RANKS)),
        "num_communication_rounds": 2, "local_num_epochs": 1, "local_batch_size": 16,
        "local_micro_batch_size": 8, "local_learning_rate": 1e-2, "bf16": "false", "seed": 5,
    }  # fmt: skip
    argv = [part for key, value in options.items() for part in (f"--{key}", str(value))]
    return [*argv, "--no_progress", *extra]


class _Evaluated(list):
    """Logits of a probe under each model a run evaluated, in round order."""

    head_dtypes: list


def spy_evaluated(monkeypatch, probe) -> _Evaluated:
    """Record, at every evaluation of a run, the logits of ``probe`` under the very model that
    is evaluated (as the task installed it: merged or beside the weights)."""
    import rblora.evaluation.classification as classification

    evaluated, original = _Evaluated(), classification.evaluate_classifier
    evaluated.head_dtypes = []

    def spy(model, *args, **kwargs):
        evaluated.head_dtypes.append(model.classifier.weight.dtype)
        with torch.no_grad():
            evaluated.append(model(pixel_values=probe).logits.float())
        return original(model, *args, **kwargs)

    monkeypatch.setattr(classification, "evaluate_classifier", spy)
    return evaluated


def _dense(folder):
    return {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
        if "lora_" not in k
    }


@pytest.mark.parametrize("method", available_methods())
def test_two_rounds_every_method(vision, tmp_path, method, monkeypatch):
    """Heterogeneous ranks for every method: the global head is exactly the example-weighted
    mean of the client heads, and each global folder reloads with PEFT to the logits the round
    evaluated."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    probe = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    evaluated = spy_evaluated(monkeypatch, probe)
    ranks = [4, 4, 4] if get_method(method).homogeneous_ranks else RANKS  # FedIT: one rank
    argv = _argv(vision, tmp_path, "--method", method, "--client_ranks", ",".join(map(str, ranks)))
    shared_only = not get_method(method).protocol.has_global_model
    if shared_only:  # no global model: each client's own is scored on its held-out images
        argv += ["--eval_personalized", "--data_path", str(vision / "local")]
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    config = json.loads((run / "config.json").read_text())
    assert config["task_resolved"] == "image"  # inferred from the data folder
    sizes = config["client_sizes"]
    for t in (1, 2):
        heads = [_dense(run / f"round_{t}" / f"client_{k}") for k in range(3)]
        glob = _dense(run / f"round_{t}" / "global")
        assert set(glob) == {"classifier.weight", "classifier.bias"}
        for name in glob:
            weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
            mean = sum(w * h[name].double() for w, h in zip(weights, heads, strict=True))
            torch.testing.assert_close(glob[name].double(), mean, rtol=1e-6, atol=1e-7)
        base = AutoModelForImageClassification.from_pretrained(vision / "vit", num_labels=10)
        reloaded = PeftModel.from_pretrained(base, run / f"round_{t}" / "global").eval()
        if shared_only:  # the shared A with a zero B: PEFT loads it, and it is not a model
            assert (run / f"round_{t}" / "global" / "NOTE.md").is_file()
            continue
        with torch.no_grad():
            logits = reloaded(pixel_values=probe).logits
        torch.testing.assert_close(logits, evaluated[t - 1], rtol=1e-4, atol=1e-5)
    records = metrics(run)
    rounds = [r for r in records if r["type"] == "round"]
    assert rounds[-1]["reduction"] == default_reduction(method)
    if shared_only:
        assert "suites" not in rounds[-1]["eval"]  # no global figure; the clients' own below
        assert rounds[-1]["eval"]["global"].startswith("not defined")
        assert rounds[-1]["eval"]["personalized"]["clients"] == 3
        assert 0 <= rounds[-1]["eval"]["personalized"]["accuracy_mean"] <= 1
        return
    ev = rounds[-1]["eval"]
    assert ev["suites"]["test"]["count"] == 60 and len(ev["confusion_matrix"]) == 10
    assert 0 <= ev["suites"]["test"]["macro_accuracy"] <= 1
    assert set(ev["suites"]["test"]["per_class"]) <= set(ev["classes"])
    clients = [r for r in records if r["type"] == "client"]
    assert [c["rank"] for c in clients] == ranks * 2
    assert all(c["images"] == c["num_examples"] for c in clients)
    for name in ("plots/accuracy.png", "plots/loss.png", "plots/confusion.png", "summary.md"):
        assert (run / name).is_file(), name


def test_merged_total_folders_keep_each_module_at_its_own_rank(vision, tmp_path, monkeypatch):
    """FLoRA on q_proj, v_proj (32x32) and mlp.fc1 (64x32), ranks 2 + 4 + 12 = 18: in round 1
    the attention totals are dense (18 * 64 >= 32 * 32), stored as (I, dW) at rank 32, while fc1's
    is factored at rank 18 (18 * 96 < 64 * 32): one folder of two ranks (rank_pattern), with the
    head, loads with PeftModel to the logits each round evaluated."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    from rblora.adapters import load_peft_adapter

    probe = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    evaluated = spy_evaluated(monkeypatch, probe)
    argv = _argv(vision, tmp_path, "--method", "FLoRA", "--client_ranks", "2,4,12")
    assert cli.main([*argv, "--lora_target_modules", "q_proj", "v_proj", "fc1"]) == 0
    run = tmp_path / "3"
    ranks = {}
    for t in (1, 2):
        folder = run / f"round_{t}" / "global"
        base = AutoModelForImageClassification.from_pretrained(vision / "vit", num_labels=10)
        reloaded = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            logits = reloaded(pixel_values=probe).logits
        torch.testing.assert_close(logits, evaluated[t - 1], rtol=1e-4, atol=1e-5)
        assert set(_dense(folder)) == {"classifier.weight", "classifier.bias"}
        factors, _ = load_peft_adapter(folder)
        ranks[t] = {n.rsplit(".", 1)[1]: a.shape[0] for n, (a, _) in factors.items()}
    assert ranks == {1: {"q_proj": 32, "v_proj": 32, "fc1": 18}, 2: dict.fromkeys(ranks[1], 32)}


def test_head_only_baseline(vision, tmp_path):
    assert cli.main(_argv(vision, tmp_path, "--head_only")) == 0
    run = tmp_path / "3"
    glob = load_file(str(run / "round_2" / "global" / "dense.safetensors"))
    assert set(glob) == {"classifier.weight", "classifier.bias"}
    clients = [r for r in metrics(run) if r["type"] == "client"]
    # only the head travels: 10 x 32 weights + 10 biases in float32
    assert all(c["bytes_up"] == (10 * 32 + 10) * 4 for c in clients)
    # each round's top-1 hits per test image, under ids of the images (distinct)
    rounds = {r["round"]: r for r in metrics(run) if r["type"] == "round"}
    for t in (1, 2):
        items = json.loads((run / "evaluation" / f"round_{t}.json").read_text())["suites"]["test"]
        assert len(items["ids"]) == len(set(items["ids"])) == 60
        accuracy = rounds[t]["eval"]["suites"]["test"]["accuracy"]
        assert set(items) == {"ids", "accuracy"} and sum(items["accuracy"]) / 60 == accuracy


def test_image_options_and_sizes(vision, tmp_path, capsys):
    assert cli.main(_argv(vision, tmp_path / "a", "--prompt_template_name", "alpaca")) == 2
    assert "option(s) of the lm task" in capsys.readouterr().err
    assert cli.main(_argv(vision, tmp_path / "b", "--image_size", "20")) == 2
    assert "cannot classify 20 px images" in capsys.readouterr().err
    assert cli.main(_argv(vision, tmp_path / "c", "--client_ranks", "2,4,64")) == 2
    assert "rank 64 is above 32" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_attention_targets_found_by_name():
    from torch import nn

    from rblora.tasks.image import attention_targets

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attn()
            self.classifier = nn.Linear(4, 2)

    assert attention_targets(Model()) == ["query", "value"]
    with pytest.raises(ValueError, match="lora_target_modules"):
        attention_targets(nn.Sequential(nn.Linear(4, 4)))


def test_image_run_resumes_to_the_same_adapters(vision, tmp_path):
    cut, full = tmp_path / "cut", tmp_path / "full"
    assert cli.main(_argv(vision, cut, "--num_communication_rounds", "1")) == 0
    assert cli.main(_argv(vision, cut, "--resume")) == 0
    assert cli.main(_argv(vision, full)) == 0
    for sub in ("round_2/global", "round_2/client_2"):
        a = load_file(str(cut / "3" / sub / "adapter_model.safetensors"))
        b = load_file(str(full / "3" / sub / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra", [["--method", "FLoRA"], ["--method", "Uniform HETLoRA", "--reduction_method", "merge"]]
)
def test_head_only_with_the_merge_redistribution_is_refused_up_front(
    vision, tmp_path, extra, capsys
):
    """It trained round 1, then crashed (nothing to merge) and was reported as bad input."""
    assert cli.main(_argv(vision, tmp_path / "out", "--head_only", *extra)) == 2
    err = capsys.readouterr().err
    assert "--head_only trains no LoRA" in err and "--reduction_method svd or truncate" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_compare_head_only_cell_over_flora_options_is_refused_before_any_cell(
    vision, tmp_path, capsys
):
    from rblora.cli import main as rblora

    base = _argv(vision, tmp_path / "unused", "--method", "FLoRA")
    i = base.index("--output_dir")
    del base[i : i + 2]
    argv = ["compare", "--methods", "FLoRA,head-only", "--seeds", "1"]
    assert rblora([*argv, "--output_dir", str(tmp_path / "cmp"), "--", *base]) == 2
    err = capsys.readouterr().err
    assert "head-only: --head_only trains no LoRA" in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()


def test_a_bf16_body_keeps_a_float32_head_and_reloads_to_the_evaluated_model(
    vision, tmp_path, monkeypatch
):
    """--base_dtype bfloat16: the body in bf16, the head trained and averaged in float32, the
    global update beside the weights; the folder reloads with PEFT on a bf16 body to the
    logits the round evaluated."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    probe = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    evaluated = spy_evaluated(monkeypatch, probe)
    argv = _argv(vision, tmp_path, "--base_dtype", "bfloat16", "--num_communication_rounds", "1")
    assert cli.main(argv) == 0
    assert evaluated.head_dtypes == [torch.float32]
    heads = _dense(tmp_path / "3" / "round_1" / "global")
    assert all(t.dtype == torch.float32 for t in heads.values())
    base = AutoModelForImageClassification.from_pretrained(
        vision / "vit", num_labels=10, dtype=torch.bfloat16
    )
    base.classifier.float()
    base.classifier.register_forward_pre_hook(lambda m, args: (args[0].float(),))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "3" / "round_1" / "global").eval()
    with torch.no_grad():
        logits = reloaded(pixel_values=probe).logits.float()
    torch.testing.assert_close(logits, evaluated[0], rtol=1e-5, atol=1e-5)


def test_hetlora_rank_self_pruning_on_the_image_task(vision, tmp_path):
    """The image task prunes as the language-model one does: with --hetlora_lambda each client
    replies in round 2 at its rank or at max(1, floor(r / 2)) (round 1 starts from B = 0: nobody
    prunes), the head trained in full beside it, and the run completes."""
    from safetensors.torch import load_file

    argv = _argv(vision, tmp_path, "--method", "HETLoRA", "--hetlora_lambda", "50")
    assert cli.main(argv) == 0
    for t, allowed in ((1, lambda r: {r}), (2, lambda r: {r, max(1, r // 2)})):
        for k, r in enumerate(RANKS):
            tensors = load_file(str(tmp_path / "3" / f"round_{t}" / f"client_{k}" /
                                    "adapter_model.safetensors"))  # fmt: skip
            ranks = {v.shape[0] for key, v in tensors.items() if key.endswith("lora_A.weight")}
            assert len(ranks) == 1 and ranks <= allowed(r), (t, k, ranks)


def test_head_only_with_fedsa_lora_is_refused_up_front(vision, tmp_path, capsys):
    argv = _argv(
        vision, tmp_path / "out", "--head_only", "--method", "FedSA", "--eval_personalized"
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "FedSA-LoRA's clients have no B to keep" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
