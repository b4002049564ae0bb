"""Attach a rank-r LoRA to the one base model of a run, read it out, take it off, merge deltas.

The base model stays in memory for the whole run: ``attach_lora`` injects PEFT LoRA layers into it
in place, ``detach_lora`` removes them without merging (base weights bitwise unchanged). Dense
extra parameters (``LoraSpec.modules_to_save``, e.g. a classification head) are trained in full
while attached and put back to their attach-time values on detach. Global updates on the base
(evaluation, FLoRA's merged total) live in :mod:`rblora.adapters.deltas`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from rblora.adapters.spec import (
    Factors,
    LoraSpec,
    check_factors,
    dense_parameters,
    resolve_targets,
)

_ADAPTER = "default"
_FLAGS_ATTR = "_rblora_base_requires_grad"
_DENSE_ATTR = "_rblora_dense_at_attach"


def attach_lora(
    base_model: nn.Module,
    spec: LoraSpec,
    *,
    init: Factors | None = None,
    dense: dict[str, torch.Tensor] | None = None,
    seed: int,
) -> PeftModel:
    """Wrap ``base_model`` (in place) with a LoRA of ``spec.rank`` and return the PEFT model.

    ``init=None``: a fresh LoRA, ``A: (r, d_in)`` kaiming-uniform (PEFT's ``a=sqrt(5)``, i.e.
    U(-1/sqrt(d_in), 1/sqrt(d_in))) drawn from a ``torch.Generator`` seeded with ``seed``, modules
    in sorted name order; ``B: (d_out, r)`` zero. Otherwise ``init`` must hold exactly the targeted
    modules with raw PEFT factors of rank ``spec.rank``; they are copied in. The global torch RNG is
    left untouched. Base parameters are frozen while attached; ``detach_lora`` restores their flags.

    The parameters of ``spec.modules_to_save`` are trainable while attached, starting from
    ``dense`` (parameter name -> tensor, e.g. the server's averaged head) or, if None, from their
    current values; ``detach_lora`` puts back the values they had before this call.
    """
    targets = resolve_targets(base_model, spec)
    if init is not None:
        check_factors(init, targets, spec.rank, "attach_lora init")
    extras = dense_parameters(base_model, spec.modules_to_save)
    if dense is not None:
        check_dense(dense, extras, "attach_lora dense")
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    saved = {n: p.detach().clone() for n, p in extras.items()}
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
    setattr(peft_model, _DENSE_ATTR, saved)
    with torch.no_grad():
        for n, p in extras.items():
            if dense is not None:
                p.copy_(dense[n])
            p.requires_grad_(True)
    init_factors(lora_layers(peft_model), targets, init, seed)
    return peft_model


def init_factors(
    layers: dict[str, nn.Module], targets: dict, init: Factors | None, seed: int
) -> None:
    """Write a client's start into the LoRA weights of ``layers`` (name -> PEFT LoRA layer), in
    place: ``init``'s factors, or if None a fresh LoRA, ``A`` kaiming-uniform from a generator
    seeded with ``seed`` (modules in the order of ``targets``, sorted by name) and ``B`` zero."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name in targets:
            a = layers[name].lora_A[_ADAPTER].weight
            b = layers[name].lora_B[_ADAPTER].weight
            if init is None:
                # drawn on the CPU (the generator's device) so every device gives the same init
                fresh = torch.empty(a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
                a.copy_(fresh)
                b.zero_()
            else:
                a.copy_(init[name][0])
                b.copy_(init[name][1])


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
    """Detached float32 CPU clones ``{name: (A: (r, d_in), B: (d_out, r))}`` of the LoRA weights
    (the server side of a run works on the CPU whatever device the model trains on)."""
    out: Factors = {}
    for name, layer in lora_layers(peft_model).items():
        a = layer.lora_A[_ADAPTER].weight.detach().to("cpu", torch.float32, copy=True)
        b = layer.lora_B[_ADAPTER].weight.detach().to("cpu", torch.float32, copy=True)
        out[name] = (a, b)
    if not out:
        raise ValueError("read_factors: the model carries no LoRA layers")
    return out


@contextlib.contextmanager
def dense_only(
    model: nn.Module, modules_to_save: list[str], dense: dict[str, torch.Tensor] | None = None
) -> Iterator[nn.Module]:
    """Train only the parameters of ``modules_to_save`` (no LoRA; a head-only baseline).

    Inside the block those parameters require grad (starting from ``dense`` if given) and every
    other parameter is frozen; afterwards values and flags are put back as they were.
    """
    extras = dense_parameters(model, modules_to_save)
    if not extras:
        raise ValueError("dense_only: no modules_to_save, so nothing would train")
    if dense is not None:
        check_dense(dense, extras, "dense_only dense")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved = {n: p.detach().clone() for n, p in extras.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            for n, p in extras.items():
                if dense is not None:
                    p.copy_(dense[n])
                p.requires_grad_(True)
        yield model
    finally:
        set_dense(model, saved)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def read_dense(peft_model: nn.Module, modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """Float32 CPU clones of the parameters of ``modules_to_save`` (name -> tensor, base names)."""
    base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    return {
        n: p.detach().to("cpu", torch.float32, copy=True)
        for n, p in dense_parameters(base, modules_to_save).items()
    }


def set_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Copy ``dense`` (parameter name -> tensor) into the model's parameters, in place."""
    params = dict(model.named_parameters())
    missing = sorted(set(dense) - set(params))
    if missing:
        raise ValueError(f"set_dense: the model has no parameters {missing}")
    with torch.no_grad():
        for n, value in dense.items():
            if params[n].shape != value.shape:
                raise ValueError(
                    f"set_dense: {n} has shape {tuple(params[n].shape)}, got {tuple(value.shape)}"
                )
            params[n].copy_(value)


def check_dense(dense: dict[str, torch.Tensor], expected: dict[str, nn.Parameter], what: str):
    """Raise ValueError unless ``dense`` has exactly the ``expected`` parameters' names/shapes."""
    missing = sorted(set(expected) - set(dense))
    unexpected = sorted(set(dense) - set(expected))
    bad = [n for n in set(dense) & set(expected) if dense[n].shape != expected[n].shape]
    if missing or unexpected or bad:
        raise ValueError(
            f"{what}: missing {missing}, unexpected {unexpected}, wrong shape {sorted(bad)}"
        )


def detach_lora(peft_model: PeftModel) -> nn.Module:
    """Remove the LoRA layers without merging; return the base model exactly as it was before
    ``attach_lora`` (same weights bitwise, dense extras put back, same ``requires_grad``)."""
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"detach_lora expects a PeftModel, got {type(peft_model).__name__}")
    flags = getattr(peft_model, _FLAGS_ATTR, None)
    saved = getattr(peft_model, _DENSE_ATTR, {})
    base = peft_model.unload()
    set_dense(base, saved)
    if flags is not None:
        for n, p in base.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
    return base
