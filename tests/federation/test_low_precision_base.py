"""A base stored in bf16 (``--base_dtype bfloat16``): the global update stays beside the weights
in float32, so every round's global folder reloads with PEFT on the same bf16 base to the model
the round evaluated, and FLoRA's merged total is not rounded into the weights."""

from __future__ import annotations

import pytest
import torch
from run_helpers import lm_argv

from rblora.federation import cli

PROBE = torch.tensor([[5, 17, 33, 40, 8, 61, 12]])


@pytest.mark.parametrize(("method", "reduction"), [("FLoRA", "merge"), ("RB-LoRA", "svd")])
def test_global_folders_reload_to_the_evaluated_model_on_a_bf16_base(
    workspace, tmp_path, monkeypatch, method, reduction
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import rblora.evaluation as evaluation

    evaluated = []
    original = evaluation.evaluate_encoded

    def spy(model, *args, **kwargs):
        with torch.no_grad():
            evaluated.append(model(PROBE).logits.float())
        return original(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_encoded", spy)
    argv = lm_argv(workspace, tmp_path, "--method", method, "--reduction_method", reduction)
    assert cli.main([*argv, "--base_dtype", "bfloat16", "--local_learning_rate", "5e-2"]) == 0
    assert len(evaluated) == 2
    base = AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.bfloat16)
    with torch.no_grad():
        untouched = base(PROBE).logits.float()
    for t in (1, 2):
        folder = tmp_path / "3" / f"round_{t}" / "global"
        reloaded = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            logits = reloaded(PROBE).logits.float()
        torch.testing.assert_close(logits, evaluated[t - 1], rtol=1e-5, atol=1e-5)
        base = reloaded.unload()
    assert not torch.equal(evaluated[1], untouched)  # the rounds changed the model


def test_a_small_update_merged_into_bf16_weights_is_mostly_lost_but_kept_beside():
    """The issue's arithmetic: an update of 1.8e-5 on weights of 0.04 keeps about 13% of itself
    when merged into bf16 weights; beside them it is kept exactly, and the module computes what a
    PEFT LoRA holding it computes on the same bf16 weight."""
    from rblora.adapters import BaseWeights, keep_beside

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(0.04 * torch.randn(128, 256, generator=gen))
    model = model.to(torch.bfloat16)
    w0 = model[0].weight.detach().clone()
    a = torch.randn(4, 256, generator=gen)
    b = torch.randn(128, 4, generator=gen)
    b *= 1.8e-5 / float((b @ a).abs().mean())
    delta = {"0": (a, b)}
    assert keep_beside(model, autocast_bf16=False)

    merged = BaseWeights(model)
    merged.set(delta, merged=True)
    realized = model[0].weight.float() - w0.float()
    lost = float((realized - b @ a).norm() / (b @ a).norm())
    assert lost > 0.5  # most of the update is rounding noise in bf16 weights
    merged.set({}, merged=True)
    assert torch.equal(model[0].weight, w0)

    beside = BaseWeights(model)
    beside.set(delta, merged=False)
    assert torch.equal(model[0].weight, w0)  # W0 untouched, D kept in float32 beside it
    x = torch.randn(8, 256, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        got = model(x)
        lora = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b)
        expected = (torch.nn.functional.linear(x, w0) + lora).to(torch.bfloat16)
    assert torch.equal(got, expected)
    beside.set({}, merged=False)
    with torch.no_grad():
        assert torch.equal(model(x), torch.nn.functional.linear(x, w0))


def test_keep_beside_follows_the_compute_precision():
    from rblora.adapters import keep_beside

    model = torch.nn.Linear(4, 4)
    assert not keep_beside(model, autocast_bf16=False)  # float32 weights in float32: merge
    assert keep_beside(model, autocast_bf16=True)  # autocast casts a merged weight to bf16
    assert keep_beside(model.to(torch.bfloat16), autocast_bf16=False)


def test_base_dtype_is_checked(workspace, tmp_path, capsys):
    assert cli.main(lm_argv(workspace, tmp_path, "--base_dtype", "float16")) == 2
    assert "base_dtype 'float16': valid are auto, float32, bfloat16" in capsys.readouterr().err


@pytest.mark.slow
def test_the_embedded_model_on_a_bf16_base_reloads_to_the_evaluated_model(tmp_path):
    """SmolLM2 stored in bf16 with a small rank-8 update on every q/v projection: evaluated
    beside the weights it is the model PEFT reloads from the folder; merged into the bf16
    weights it is not."""
    from peft import PeftModel

    from rblora.adapters import applied_delta, save_peft_adapter
    from rblora.assets import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m-instruct", dtype=torch.bfloat16)
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    gen = torch.Generator().manual_seed(0)
    delta = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            d_out, d_in = module.weight.shape
            a = torch.randn(8, d_in, generator=gen) / d_in**0.5
            delta[name] = (a, torch.randn(d_out, 8, generator=gen) * 2e-4)
    with torch.no_grad():
        with applied_delta(model, delta, merged=False):
            beside = model(**ids).logits.float()
        with applied_delta(model, delta, merged=True):
            merged = model(**ids).logits.float()
        plain = model(**ids).logits.float()
    save_peft_adapter(tmp_path / "folder", delta, rank=8, lora_alpha=8.0,
                      target_modules=["q_proj", "v_proj"], use_rslora=False,
                      base_model_name_or_path="")  # fmt: skip
    reloaded = PeftModel.from_pretrained(model, tmp_path / "folder").eval()
    with torch.no_grad():
        peft_logits = reloaded(**ids).logits.float()
    torch.testing.assert_close(peft_logits, beside, rtol=1e-5, atol=1e-5)
    effect = (beside - plain).abs().mean()
    assert effect > 0 and (merged - beside).abs().mean() > 0.1 * effect
