"""Attach a rank-r LoRA to the one base model of a run, read it out, take it off, merge deltas.

The base model stays in memory for the whole run: ``attach_lora`` injects PEFT LoRA layers into it
in place, ``detach_lora`` removes them without merging (base weights bitwise unchanged). Dense
extra parameters (``LoraSpec.modules_to_save``, e.g. a classification head) are trained in full
while attached and put back to their attach-time values on detach. The base weights change only
through ``merge_into_base``, ``applied_delta`` (temporarily) and :class:`BaseWeights` (FLoRA's
merge protocol: ``W = W0 + D``), and through ``set_dense``.
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
from rblora.aggregation.running import ModuleDelta, delta_shape, is_dense

_ADAPTER = "default"
_FLAGS_ATTR = "_rblora_base_requires_grad"
_DENSE_ATTR = "_rblora_dense_at_attach"
_BASE_ATTR = "_rblora_base_weights"


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
    gen = torch.Generator().manual_seed(int(seed))
    layers = lora_layers(peft_model)
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


def _linear_weights(model: nn.Module, names, what: str) -> dict[str, torch.Tensor]:
    """The weight of each named ``nn.Linear`` (the base layer if a LoRA is attached)."""
    modules = dict(model.named_modules())
    weights, unknown = {}, []
    for name in names:
        mod = modules.get(name)
        mod = getattr(mod, "base_layer", mod)
        if isinstance(mod, nn.Linear):
            weights[name] = mod.weight
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{what}: {unknown} are not linear modules of the model")
    return weights


def _check_deltas(deltas: dict[str, ModuleDelta], weights: dict[str, torch.Tensor], what: str):
    bad = [
        f"{n}: {delta_shape(d)} vs weight {tuple(weights[n].shape)}"
        for n, d in deltas.items()
        if delta_shape(d) != tuple(weights[n].shape)
        or (not is_dense(d) and d[0].shape[0] != d[1].shape[1])
    ]
    if bad:
        raise ValueError(f"{what}: shapes do not fit: {'; '.join(bad)}")


def _dense_delta(delta: ModuleDelta, device: torch.device) -> torch.Tensor:
    """``B @ A`` (or the dense delta) in float32 on ``device``."""
    if is_dense(delta):
        return delta.to(device, torch.float32)
    a, b = delta
    return b.to(device, torch.float32) @ a.to(device, torch.float32)


def merge_into_base(base_model: nn.Module, deltas: dict[str, ModuleDelta]) -> None:
    """Add each delta to its module's weight, in place.

    ``deltas``: ``{name: (A: (r, d_in), B: (d_out, r))}`` with the scale ALREADY folded into B,
    or ``{name: dense (d_out, d_in)}``. The delta is computed in float32 on the weight's device
    and added in float32 (then cast back to the weight's dtype). Every module and shape is
    checked before any weight changes. If a LoRA is attached, its frozen base layer is updated.
    """
    weights = _linear_weights(base_model, deltas, "merge_into_base")
    _check_deltas(deltas, weights, "merge_into_base")
    with torch.no_grad():
        for name, delta in deltas.items():
            w = weights[name]
            d = _dense_delta(delta, w.device)
            if w.dtype == torch.float32:
                w.add_(d)
            else:
                w.copy_((w.to(torch.float32) + d).to(w.dtype))


@contextlib.contextmanager
def applied_delta(model: nn.Module, delta: dict[str, ModuleDelta]) -> Iterator[nn.Module]:
    """Temporarily add ``delta`` to the base weights (e.g. to evaluate base + global update).

    The touched weights are cloned first and copied back afterwards, so the base is bitwise
    unchanged when the block ends (subtracting the delta again would not be exact).
    """
    weights = _linear_weights(model, delta, "applied_delta")
    saved = {name: w.detach().clone() for name, w in weights.items()}
    try:
        merge_into_base(model, delta)
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                weights[name].copy_(weight)


class BaseWeights:
    """The base model's linear weights as ``W0 + D`` for a running total ``D`` (merge protocol).

    The original ``W0`` of a module is kept on the CPU the first time :meth:`set` touches it, and
    every call recomputes ``W = W0 + D`` from it in float32. The weights after round t therefore
    depend only on ``D_t``, not on the order of the additions that built it: a run resumed from
    a checkpoint of ``D_t`` has bitwise the weights of the run that never stopped.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._original: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, model: nn.Module) -> BaseWeights:
        """The one BaseWeights of ``model`` (kept on the model): every holder of the model sets
        its weights from the same originals."""
        found = getattr(model, _BASE_ATTR, None)
        if found is None:
            found = cls(model)
            setattr(model, _BASE_ATTR, found)
        return found

    def set(self, total: dict[str, ModuleDelta]) -> None:
        """Make each touched module's weight ``W0 + total[module]`` (``W0`` where absent)."""
        names = set(total) | set(self._original)
        weights = _linear_weights(self.model, sorted(names), "BaseWeights.set")
        _check_deltas(total, weights, "BaseWeights.set")
        with torch.no_grad():
            for name in sorted(names):
                w = weights[name]
                if name not in self._original:
                    self._original[name] = w.detach().to("cpu", copy=True)
                original = self._original[name].to(w.device)
                if name in total:
                    w.copy_(original.to(torch.float32) + _dense_delta(total[name], w.device))
                else:
                    w.copy_(original)
