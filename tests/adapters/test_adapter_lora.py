"""attach / read / detach / merge on the tiny Llama (hidden 32, kv dim 16)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import build_tiny_llama

from rblora.adapters import (
    LoraSpec,
    attach_lora,
    detach_lora,
    merge_into_base,
    read_factors,
    resolve_targets,
)

QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
      "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]  # fmt: skip


def random_factors(model, spec, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_in, d_out) in resolve_targets(model, spec).items():
        a = torch.randn(spec.rank, d_in, generator=g) * scale
        b = torch.randn(d_out, spec.rank, generator=g) * scale
        out[name] = (a, b)
    return out


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSpec(rank=4, dropout=1.0)
    with pytest.raises(ValueError, match=r"\['q_proj'\]"):
        LoraSpec(rank=4, target_modules="q_proj")
    assert LoraSpec(rank=4, lora_alpha=16).scaling == 4.0
    assert LoraSpec(rank=4, lora_alpha=16, use_rslora=True).scaling == 8.0


def test_resolve_targets_names_and_rank(tiny_llama):
    spec = LoraSpec(rank=4)
    assert list(resolve_targets(tiny_llama, spec)) == QV
    assert resolve_targets(tiny_llama, spec)["model.layers.0.self_attn.v_proj"] == (32, 16)
    with pytest.raises(ValueError, match="query.*q_proj"):
        resolve_targets(tiny_llama, LoraSpec(rank=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="rank 17 is above min.* = 16"):
        resolve_targets(tiny_llama, LoraSpec(rank=17))
    resolve_targets(tiny_llama, LoraSpec(rank=17, target_modules=["q_proj"]))  # 32x32: fine


def test_fresh_init_is_seeded_kaiming_and_zero_b(tiny_llama):
    spec = LoraSpec(rank=4)
    rng_before = torch.get_rng_state()
    pm = attach_lora(tiny_llama, spec, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    f1 = read_factors(pm)
    base = detach_lora(pm)
    f2 = read_factors(attach_lora(base, spec, seed=7))
    assert list(f1) == QV
    for name, (a, b) in f1.items():
        assert a.dtype == torch.float32 and a.shape == (4, 32)
        assert torch.all(b == 0)
        assert a.abs().max() <= 1 / math.sqrt(32)
        assert a.abs().max() > 0.5 / math.sqrt(32)  # uniform over the whole bound
        assert torch.equal(a, f2[name][0])
    base = detach_lora(pm)
    f3 = read_factors(attach_lora(base, spec, seed=8))
    assert not torch.equal(f1[QV[0]][0], f3[QV[0]][0])


def test_init_factors_roundtrip_and_checks(tiny_llama):
    spec = LoraSpec(rank=3)
    init = random_factors(tiny_llama, spec)
    pm = attach_lora(tiny_llama, spec, init=init, seed=0)
    got = read_factors(pm)
    for name in init:
        assert torch.equal(got[name][0], init[name][0])
        assert torch.equal(got[name][1], init[name][1])
    got[QV[0]][0].add_(1.0)  # clones: the model is not affected
    assert torch.equal(read_factors(pm)[QV[0]][0], init[QV[0]][0])
    base = detach_lora(pm)
    missing = dict(init)
    del missing[QV[1]]
    with pytest.raises(ValueError, match=r"missing modules \['model.layers.0.self_attn.v_proj'\]"):
        attach_lora(base, spec, init=missing, seed=0)
    extra = dict(init, **{"model.layers.0.mlp.up_proj": init[QV[0]]})
    with pytest.raises(ValueError, match="unexpected modules"):
        attach_lora(base, spec, init=extra, seed=0)
    wrong = dict(init, **{QV[0]: (init[QV[0]][0][:2], init[QV[0]][1][:, :2])})
    with pytest.raises(ValueError, match=r"expected A \(3, 32\)"):
        attach_lora(base, spec, init=wrong, seed=0)
    # nothing half-attached after the failures
    assert not any(hasattr(m, "lora_A") for m in base.modules())


def test_attach_train_detach_leaves_base_bitwise_unchanged(tiny_llama):
    tiny_llama.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    pm = attach_lora(tiny_llama, LoraSpec(rank=4, dropout=0.0), seed=0)
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(b.abs().sum() > 0 for _, b in read_factors(pm).values())
    base = detach_lora(pm)
    assert base is tiny_llama
    after = base.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert not hasattr(base, "peft_config")


def test_lora_delta_and_merge_match_attached_forward(tiny_llama):
    spec = LoraSpec(rank=4, lora_alpha=8, dropout=0.0)  # scaling 2
    factors = random_factors(tiny_llama, spec, seed=1)
    ids = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    w0 = tiny_llama.model.layers[1].self_attn.v_proj.weight.clone()
    pm = attach_lora(tiny_llama, spec, init=factors, seed=0).eval()
    with torch.no_grad():
        attached = pm(input_ids=ids).logits
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
        a, b = factors[QV[3]]
        expected = x @ (w0 + 2.0 * b @ a).T  # independent: W0 + s B A
        layer_out = pm.base_model.model.model.layers[1].self_attn.v_proj(x)
    torch.testing.assert_close(layer_out, expected, rtol=1e-5, atol=1e-6)
    base = detach_lora(pm)
    deltas = {n: (a, spec.scaling * b) for n, (a, b) in factors.items()}
    merge_into_base(base, deltas)
    torch.testing.assert_close(base.model.layers[1].self_attn.v_proj.weight, w0 + 2.0 * b @ a)
    with torch.no_grad():
        merged = base(input_ids=ids).logits
    torch.testing.assert_close(merged, attached, rtol=1e-5, atol=1e-5)


def test_merge_checks_everything_before_changing_anything(tiny_llama):
    spec = LoraSpec(rank=2)
    deltas = random_factors(tiny_llama, spec)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    bad = dict(deltas, **{"model.layers.9.self_attn.q_proj": deltas[QV[0]]})
    with pytest.raises(ValueError, match="layers.9"):
        merge_into_base(tiny_llama, bad)
    bad = dict(deltas, **{QV[3]: (deltas[QV[0]][0], deltas[QV[0]][1])})  # B has d_out 32, not 16
    with pytest.raises(ValueError, match="v_proj"):
        merge_into_base(tiny_llama, bad)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


def test_second_base_model_gets_distinct_attachment():
    m = build_tiny_llama(seed=3)
    pm = attach_lora(m, LoraSpec(rank=2, target_modules=["o_proj"]), seed=0)
    assert list(read_factors(pm)) == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    with pytest.raises(ValueError, match="already carries a LoRA"):
        attach_lora(pm.get_base_model(), LoraSpec(rank=2), seed=0)
