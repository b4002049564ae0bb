"""Global updates on the base model: merged into its weights, or kept beside them in float32.

A global update ``D`` of a module (``(A: (k, d_in), B: (d_out, k))`` with the scale folded into
B, or dense ``(d_out, d_in)``) reaches the model in one of two ways:

- **merged**: ``W = W0 + D`` in the weight itself. Exact when the weight is float32 and is
  multiplied in float32, and free at run time.
- **beside** (unmerged): ``W0`` is left as it is and a forward hook on the linear module adds
  ``D x``, computed from float32 factors exactly as PEFT computes an unmerged LoRA (the input
  cast to the factors' dtype, ``B (A x)``, the sum cast back to the output's dtype). Needed when
  the base computes in bf16 (a bf16-stored base, or bf16 autocast): a bf16 weight of 0.04 has a
  quantum of 1.5e-4, so an update of 1.8e-5 merged into it keeps 13% of itself, while beside it
  is a separate term whose rounding is relative to itself, and the model is then the very one a
  PEFT folder of the same factors gives on the same base.

:func:`keep_beside` decides for a model and its compute precision; :func:`applied_delta`
(temporarily, e.g. to evaluate base + update) and :class:`BaseWeights` (for good: FLoRA's
``W0 + D``) take the decision as ``merged=``. A PEFT LoRA attached on top wraps the linear
module as its ``base_layer``; the hook stays on that module and keeps adding ``D x``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rblora.aggregation.running import ModuleDelta, delta_shape, is_dense

_BASE_ATTR = "_rblora_base_weights"


def keep_beside(model: nn.Module, autocast_bf16: bool) -> bool:
    """True if a global update must stay beside ``model``'s weights (see the module doc): its
    linear weights are not float32, or it computes under bf16 autocast."""
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)}
    return autocast_bf16 or dtypes != {torch.float32}


def _linear_modules(model: nn.Module, names, what: str) -> dict[str, nn.Linear]:
    """Each named ``nn.Linear`` (the base layer if a LoRA is attached)."""
    modules = dict(model.named_modules())
    found, unknown = {}, []
    for name in names:
        mod = modules.get(name)
        mod = getattr(mod, "base_layer", mod)
        if isinstance(mod, nn.Linear):
            found[name] = mod
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{what}: {unknown} are not linear modules of the model")
    return found


def _check_deltas(deltas: dict[str, ModuleDelta], modules: dict[str, nn.Linear], what: str):
    bad = [
        f"{n}: {delta_shape(d)} vs weight {tuple(modules[n].weight.shape)}"
        for n, d in deltas.items()
        if delta_shape(d) != tuple(modules[n].weight.shape)
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
    and added in float32 (then cast back to the weight's dtype: lossy for a bf16 weight, see the
    module doc). Every module and shape is checked before any weight changes. If a LoRA is
    attached, its frozen base layer is updated.
    """
    modules = _linear_modules(base_model, deltas, "merge_into_base")
    _check_deltas(deltas, modules, "merge_into_base")
    with torch.no_grad():
        for name, delta in deltas.items():
            w = modules[name].weight
            d = _dense_delta(delta, w.device)
            if w.dtype == torch.float32:
                w.add_(d)
            else:
                w.copy_((w.to(torch.float32) + d).to(w.dtype))


class _DeltaHook:
    """Forward hook adding ``D x`` to a linear module's output (see the module doc): ``D`` as
    float32 factors ``(A, B)`` or a dense float32 matrix, on the module's device."""

    def __init__(self, delta: ModuleDelta, device: torch.device):
        if is_dense(delta):
            self.factors = (delta.detach().to(device, torch.float32),)
        else:
            a, b = delta
            self.factors = (
                a.detach().to(device, torch.float32),
                b.detach().to(device, torch.float32),
            )

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        x = x.to(self.factors[0].dtype)
        for factor in self.factors:  # dense: x D^T; factored: (x A^T) B^T
            x = F.linear(x, factor)
        return (output + x).to(output.dtype)


class _HookSet:
    """Delta hooks installed on named linear modules, removable as one."""

    def __init__(self, modules: dict[str, nn.Linear], deltas: dict[str, ModuleDelta]):
        self._handles = [
            modules[name].register_forward_hook(_DeltaHook(delta, modules[name].weight.device))
            for name, delta in sorted(deltas.items())
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def applied_delta(
    model: nn.Module, delta: dict[str, ModuleDelta], *, merged: bool = True
) -> Iterator[nn.Module]:
    """Temporarily apply ``delta`` to the base (e.g. to evaluate base + global update).

    ``merged``: add it into the weights, which are cloned first and copied back afterwards, so
    the base is bitwise unchanged when the block ends (subtracting the delta again would not be
    exact); else keep it beside the weights (forward hooks, removed when the block ends).
    """
    modules = _linear_modules(model, delta, "applied_delta")
    _check_deltas(delta, modules, "applied_delta")
    if not merged:
        hooks = _HookSet(modules, delta)
        try:
            yield model
        finally:
            hooks.remove()
        return
    saved = {name: m.weight.detach().clone() for name, m in modules.items()}
    try:
        merge_into_base(model, delta)
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)


class BaseWeights:
    """The base model as ``W0 + D`` for a running total ``D`` (merge protocol), merged into the
    weights or kept beside them (see the module doc).

    Merged: the original ``W0`` of a module is kept on the CPU the first time :meth:`set` touches
    it, and every call recomputes ``W = W0 + D`` from it in float32. Beside: the weights stay
    ``W0`` and every call replaces the hooks adding ``D x``. Either way the model after round t
    depends only on ``D_t``, not on the order of the additions that built it: a run resumed from
    a checkpoint of ``D_t`` has bitwise the model of the run that never stopped.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._original: dict[str, torch.Tensor] = {}
        self._hooks: _HookSet | None = None

    @classmethod
    def of(cls, model: nn.Module) -> BaseWeights:
        """The one BaseWeights of ``model`` (kept on the model): every holder of the model sets
        its weights from the same originals."""
        found = getattr(model, _BASE_ATTR, None)
        if found is None:
            found = cls(model)
            setattr(model, _BASE_ATTR, found)
        return found

    def set(self, total: dict[str, ModuleDelta], *, merged: bool = True) -> None:
        """Make each touched module ``W0 + total[module]`` (``W0`` where absent): in its weight
        (``merged``) or beside it."""
        names = set(total) | set(self._original)
        modules = _linear_modules(self.model, sorted(names), "BaseWeights.set")
        _check_deltas(total, modules, "BaseWeights.set")
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        with torch.no_grad():
            for name in sorted(names):
                w = modules[name].weight
                if name not in self._original:
                    if not merged:
                        continue  # never merged into: W0 as it is
                    self._original[name] = w.detach().to("cpu", copy=True)
                original = self._original[name].to(w.device)
                if merged and name in total:
                    w.copy_(original.to(torch.float32) + _dense_delta(total[name], w.device))
                else:
                    w.copy_(original)
        if not merged and total:
            self._hooks = _HookSet({n: modules[n] for n in total}, total)
