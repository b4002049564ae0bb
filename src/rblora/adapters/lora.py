"""Attach a rank-r LoRA to the one base model of a run, read it out, take it off, merge deltas.

The base model stays in memory for the whole run: ``attach_lora`` injects PEFT LoRA layers into it
in place, ``detach_lora`` removes them without merging (base weights bitwise unchanged), and
``merge_into_base`` is the only function that changes base weights (FLoRA's merge protocol).
"""

from __future__ import annotations

import math
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from rblora.adapters.spec import Factors, LoraSpec, check_factors, resolve_targets

_ADAPTER = "default"
_FLAGS_ATTR = "_rblora_base_requires_grad"


def attach_lora(
    base_model: nn.Module, spec: LoraSpec, *, init: Factors | None = None, seed: int
) -> PeftModel:
    """Wrap ``base_model`` (in place) with a LoRA of ``spec.rank`` and return the PEFT model.

    ``init=None``: a fresh LoRA, ``A: (r, d_in)`` kaiming-uniform (PEFT's ``a=sqrt(5)``, i.e.
    U(-1/sqrt(d_in), 1/sqrt(d_in))) drawn from a ``torch.Generator`` seeded with ``seed``, modules
    in sorted name order; ``B: (d_out, r)`` zero. Otherwise ``init`` must hold exactly the targeted
    modules with raw PEFT factors of rank ``spec.rank``; they are copied in. The global torch RNG is
    left untouched. Base parameters are frozen while attached; ``detach_lora`` restores their flags.
    """
    targets = resolve_targets(base_model, spec)
    if init is not None:
        check_factors(init, targets, spec.rank, "attach_lora init")
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        bias="none",
    )
    # PEFT draws its own init from the global RNG: fork it so the caller's RNG state is unchanged
    # (our init below overwrites PEFT's anyway). PEFT/transformers deprecation chatter is local.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base_model, config)
    setattr(peft_model, _FLAGS_ATTR, flags)
    gen = torch.Generator().manual_seed(int(seed))
    layers = lora_layers(peft_model)
    with torch.no_grad():
        for name in targets:
            a = layers[name].lora_A[_ADAPTER].weight
            b = layers[name].lora_B[_ADAPTER].weight
            if init is None:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                b.zero_()
            else:
                a.copy_(init[name][0])
                b.copy_(init[name][1])
    return peft_model


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers of ``peft_model`` by canonical (base-model) name, sorted."""
    base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    found = {
        n: m
        for n, m in base.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and _ADAPTER in m.lora_A
    }
    return dict(sorted(found.items()))


def read_factors(peft_model: nn.Module) -> Factors:
    """Detached float32 clones ``{name: (A: (r, d_in), B: (d_out, r))}`` of the LoRA weights."""
    out: Factors = {}
    for name, layer in lora_layers(peft_model).items():
        a = layer.lora_A[_ADAPTER].weight.detach().to(torch.float32, copy=True)
        b = layer.lora_B[_ADAPTER].weight.detach().to(torch.float32, copy=True)
        out[name] = (a, b)
    if not out:
        raise ValueError("read_factors: the model carries no LoRA layers")
    return out


def detach_lora(peft_model: PeftModel) -> nn.Module:
    """Remove the LoRA layers without merging; return the base model exactly as it was before
    ``attach_lora`` (same weights bitwise, same ``requires_grad`` flags)."""
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"detach_lora expects a PeftModel, got {type(peft_model).__name__}")
    flags = getattr(peft_model, _FLAGS_ATTR, None)
    base = peft_model.unload()
    if flags is not None:
        for n, p in base.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
    return base


def merge_into_base(base_model: nn.Module, deltas: Factors) -> None:
    """Add ``B @ A`` to each named module's weight, in place (FLoRA's merge protocol).

    ``deltas``: ``{name: (A: (r, d_in), B: (d_out, r))}`` with the scale ALREADY folded into B.
    The product is computed in float32 and added in float32 (then cast back to the weight's
    dtype). Every module and shape is checked before any weight changes. If a LoRA is attached,
    its frozen base layer is updated.
    """
    modules = dict(base_model.named_modules())
    targets: dict[str, tuple[int, int]] = {}
    weights: dict[str, torch.Tensor] = {}
    unknown = []
    for name in deltas:
        mod = modules.get(name)
        mod = getattr(mod, "base_layer", mod)
        if not isinstance(mod, nn.Linear):
            unknown.append(name)
            continue
        targets[name] = (mod.in_features, mod.out_features)
        weights[name] = mod.weight
    if unknown:
        raise ValueError(f"merge_into_base: {unknown} are not linear modules of the model")
    check_factors(deltas, targets, None, "merge_into_base")
    with torch.no_grad():
        for name, (a, b) in deltas.items():
            w = weights[name]
            delta = b.to(torch.float32) @ a.to(torch.float32)
            if w.dtype == torch.float32:
                w.add_(delta)
            else:
                w.copy_((w.to(torch.float32) + delta).to(w.dtype))
