"""PEFT folder export/load: canonical keys, loadable by PeftModel.from_pretrained, atomic."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_llama

from rblora.adapters import (
    LoraSpec,
    applied_delta,
    attach_lora,
    load_peft_adapter,
    load_peft_dense,
    resolve_targets,
    save_peft_adapter,
)


def random_factors(model, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: (
            torch.randn(spec.rank, d_in, generator=g) * 0.1,
            torch.randn(d_out, spec.rank, generator=g) * 0.1,
        )
        for n, (d_in, d_out) in resolve_targets(model, spec).items()
    }


def save(path, factors, spec):
    return save_peft_adapter(
        path,
        factors,
        rank=spec.rank,
        lora_alpha=spec.lora_alpha,
        target_modules=spec.target_modules,
        use_rslora=spec.use_rslora,
        base_model_name_or_path="tiny-llama",
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_folder_loads_in_peft_with_intended_delta(tmp_path, use_rslora):
    spec = LoraSpec(rank=4, lora_alpha=16, dropout=0.0, use_rslora=use_rslora)
    base = build_tiny_llama(seed=5)
    factors = random_factors(base, spec)
    out = save(tmp_path / "global", factors, spec)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 16, use_rslora)

    loaded = PeftModel.from_pretrained(build_tiny_llama(seed=5), str(out)).eval()
    s = 16 / (2.0 if use_rslora else 4.0)
    for name, (a, b) in factors.items():
        layer = loaded.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.get_delta_weight("default"), s * b @ a)  # every module
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = attach_lora(base, spec, init=factors, seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)

    back, config = load_peft_adapter(out)
    assert config["r"] == 4 and list(back) == sorted(factors)
    for name in factors:
        assert torch.equal(back[name][0], factors[name][0])
        assert torch.equal(back[name][1], factors[name][1])


def test_save_replaces_atomically_and_validates(tmp_path, tiny_llama):
    spec = LoraSpec(rank=2)
    f1 = random_factors(tiny_llama, spec, seed=1)
    f2 = random_factors(tiny_llama, spec, seed=2)
    save(tmp_path / "a", f1, spec)
    save(tmp_path / "a", f2, spec)
    back, _ = load_peft_adapter(tmp_path / "a")
    name = next(iter(f2))
    assert torch.equal(back[name][0], f2[name][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folders left
    with pytest.raises(ValueError, match="rank 3"):
        save(tmp_path / "b", f1, LoraSpec(rank=3))
    with pytest.raises(ValueError, match="not matched by target_modules"):
        save(tmp_path / "b", f1, LoraSpec(rank=2, target_modules=["q_proj"]))
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_load_reports_bad_folders(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="does not exist"):
        load_peft_adapter(tmp_path / "nothing")
    spec = LoraSpec(rank=2)
    out = save(tmp_path / "a", random_factors(tiny_llama, spec), spec)
    state = load_file(str(out / "adapter_model.safetensors"))
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(
        2, 32
    )
    save_file(state, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys.*lora_A.default.weight"):
        load_peft_adapter(out)
    del state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="only one factor.*layers.1.self_attn.v_proj"):
        load_peft_adapter(out)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, file",
    [
        (lambda f: _truncate(f / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
        (lambda f: _truncate(f / "adapter_config.json"), "adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_bytes(b"\xff\xfe"), "adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_text('{"r": "x"}'), "adapter_config.json"),
        (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json"),
    ],
    ids=["cut", "empty", "no-weights", "cut-json", "not-utf8", "not-object", "bad-r", "no-json"],
)
def test_load_names_the_damaged_file(tmp_path, tiny_llama, damage, file):
    spec = LoraSpec(rank=2)
    out = save(tmp_path / "a", random_factors(tiny_llama, spec), spec)
    damage(out)
    for load in (load_peft_adapter, load_peft_dense):
        with pytest.raises(ValueError, match=re.escape(str(out / file))):
            load(out)


# ---------------------------------------------------------------------- modules at their own ranks
#: Names that share beginnings and ends on a 12-layer model (layers.1, layers.11): each module
#: gets its own rank and no other module does.
OWN_RANKS = {
    "model.layers.1.self_attn.q_proj": 3,
    "model.layers.11.self_attn.q_proj": 5,
    "model.layers.1.self_attn.v_proj": 1,
}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_each_module_keeps_its_own_rank_and_the_scale(tmp_path, use_rslora):
    """Factors of several ranks: the config's ``r`` is ``rank``, the others go to rank_pattern
    with the alpha_pattern that keeps the scale ``lora_alpha / rank`` on every module; the folder
    loads with PeftModel and AutoPeftModelForCausalLM to exactly those deltas, and back."""
    from peft import AutoPeftModelForCausalLM

    from rblora.adapters.peft_io import load_peft_delta

    base = build_tiny_llama(seed=5, num_hidden_layers=12)
    base.save_pretrained(tmp_path / "base")
    shapes = resolve_targets(base, LoraSpec(rank=1))
    g = torch.Generator().manual_seed(0)
    factors = {
        n: (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g))
        for n, (d_in, d_out) in shapes.items()
        for r in [OWN_RANKS.get(n, 4)]
    }
    out = save_peft_adapter(
        tmp_path / "a",
        factors,
        rank=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        use_rslora=use_rslora,
        base_model_name_or_path=str(tmp_path / "base"),
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and len(cfg["rank_pattern"]) == len(cfg["alpha_pattern"]) == 3
    scale = 8 / (2.0 if use_rslora else 4.0)  # lora_alpha / r (sqrt(r) with rsLoRA), every module
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    delta = {n: (a, scale * b) for n, (a, b) in factors.items()}
    with applied_delta(base, delta), torch.no_grad():
        expected = base(input_ids=ids).logits
    for loaded in (
        PeftModel.from_pretrained(build_tiny_llama(seed=5, num_hidden_layers=12), str(out)),
        AutoPeftModelForCausalLM.from_pretrained(out),
    ):
        loaded.eval()
        for name, (a, b) in factors.items():
            layer = loaded.base_model.model.get_submodule(name)
            assert layer.r["default"] == a.shape[0], name
            torch.testing.assert_close(layer.get_delta_weight("default"), scale * b @ a)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected)

    back, _ = load_peft_adapter(out)
    assert {n: a.shape[0] for n, (a, _) in back.items()} == {
        n: a.shape[0] for n, (a, _) in factors.items()
    }
    for name, (a, b) in load_peft_delta(out).items():
        torch.testing.assert_close(b @ a, scale * factors[name][1] @ factors[name][0])


def test_load_refuses_ranks_peft_would_not_build(tmp_path, tiny_llama):
    """A module whose factors' rank is not the one PEFT builds for it (rank_pattern, else r)."""
    shapes = resolve_targets(tiny_llama, LoraSpec(rank=1))
    factors = {n: (torch.ones(2, i), torch.ones(o, 2)) for n, (i, o) in shapes.items()}
    odd = "model.layers.1.self_attn.q_proj"
    factors[odd] = (torch.ones(3, 32), torch.ones(32, 3))
    out = save(tmp_path / "a", factors, LoraSpec(rank=2))
    config = json.loads((out / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"ranks disagree with r=2.*{re.escape(odd)}"):
        load_peft_adapter(out)


def test_delta_of_a_folder_peft_wrote_with_patterns(tmp_path):
    """load_peft_delta reads a folder as PEFT builds it: a rank_pattern module without an
    alpha_pattern entry has the scale lora_alpha / its own rank; one with an entry, its alpha."""
    from peft import LoraConfig, get_peft_model

    from rblora.adapters.peft_io import load_peft_delta

    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"^model\\.layers\\.1\\.self_attn\\.q_proj": 8, "v_proj": 2},
        alpha_pattern={"v_proj": 3},
        init_lora_weights=False,  # random B too, so every delta is non-zero
    )
    model = get_peft_model(build_tiny_llama(seed=2), config)
    model.save_pretrained(tmp_path / "peft")
    delta = load_peft_delta(tmp_path / "peft")
    assert {n: a.shape[0] for n, (a, _) in delta.items()} == {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 2,
        "model.layers.1.self_attn.q_proj": 8,
        "model.layers.1.self_attn.v_proj": 2,
    }
    for name, (a, b) in delta.items():
        want = model.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(b @ a, want)
