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
