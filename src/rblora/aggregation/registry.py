"""Method registry: name -> :class:`~.types.Method`. Adding a method = one file + one line below.

Lookups ignore case, spaces and punctuation: ``"RB-LoRA"``, ``"rb_lora"`` and ``"rblora"`` are
the same method.
"""

from __future__ import annotations

import re

from . import (
    fedex_lora,
    fedit,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora,
    florist,
    hetlora,
    rb_lora,
    rb_lora_factor,
    rolora,
    uniform_hetlora,
    weighted_hetlora,
)
from .types import REDUCTIONS, Method

_METHODS: dict[str, Method] = {}  # normalised name -> method, filled once below


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def register(method: Method) -> Method:
    """Add ``method`` under its name and aliases; a clash raises ``ValueError``."""
    known = set(method.reductions) <= set(REDUCTIONS)
    if method.default_reduction not in method.reductions or not known:
        raise ValueError(f"{method.name}: bad reductions {method.reductions}; valid: {REDUCTIONS}")
    if "threshold" in method.reductions and method.form != "stack":
        raise ValueError(f"{method.name}: threshold cuts the SVD of a stack: stack form only")
    if method.residual and (method.form != "padded" or "merge" in method.reductions):
        raise ValueError(f"{method.name}: a residual is what factors leave out: padded, no merge")
    if any(p.fixed for p in method.protocol.cycle) and method.form != "padded":
        raise ValueError(f"{method.name}: a frozen or held factor is held as it is: padded only")
    if method.update_weights is not None and method.share is not None:
        raise ValueError(f"{method.name}: weights from the updates need the whole round: no share")
    for name in (method.name, *method.aliases):
        key = _key(name)
        if key in _METHODS and _METHODS[key] is not method:
            raise ValueError(f"method name {name!r} clashes with {_METHODS[key].name!r}")
        _METHODS[key] = method
    return method


register(rb_lora.METHOD)
register(rb_lora_factor.METHOD)
register(uniform_hetlora.METHOD)
register(weighted_hetlora.METHOD)
register(hetlora.METHOD)
register(flora.METHOD)
register(flexlora.METHOD)
register(fedit.METHOD)
register(ffa_lora.METHOD)
register(rolora.METHOD)
register(fedex_lora.METHOD)
register(fedsa_lora.METHOD)
register(florist.METHOD)


def available_methods() -> list[str]:
    """Canonical names of the registered methods, in registration order."""
    return list(dict.fromkeys(m.name for m in _METHODS.values()))


def get_method(name: str) -> Method:
    """The method called ``name``; ``ValueError`` listing the valid names if there is none."""
    method = _METHODS.get(_key(name)) if isinstance(name, str) else None
    if method is None:
        raise ValueError(
            f"unknown aggregation method {name!r}; valid: {', '.join(available_methods())}"
        )
    return method


def default_reduction(name: str) -> str:
    """The redistribution rule ``name`` uses when none is asked for."""
    return get_method(name).default_reduction


def supported_reductions(name: str) -> tuple[str, ...]:
    """The redistribution rules ``name`` accepts (the default first)."""
    m = get_method(name)
    return (m.default_reduction, *(r for r in m.reductions if r != m.default_reduction))


def resolve_reduction(method: Method, reduction: str | None) -> str:
    """``reduction`` checked against ``method`` (None -> its default)."""
    if reduction is None:
        return method.default_reduction
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)} or None")
    if reduction not in method.reductions:
        why = f" ({method.reduction_note})" if method.reduction_note else ""
        if reduction == "threshold" and method.form != "stack":
            why = (
                " (threshold, FLoRIST's, cuts the SVD of the stacked client updates; this "
                "method averages factors and has no stack)"
            )
        raise ValueError(
            f"{method.name} does not support reduction {reduction!r}{why}; "
            f"valid: {', '.join(method.reductions)}"
        )
    return reduction


def check_ranks_fit(name: str, ranks: list[int]) -> None:
    """ValueError if method ``name`` cannot aggregate clients of these ``ranks``."""
    method = get_method(name)
    if method.homogeneous_ranks and len(set(ranks)) > 1:
        raise ValueError(
            f"{method.name} needs every client at the same rank, got {ranks}; give one rank "
            "(e.g. --client_ranks 8,8,...) or use a heterogeneous method"
        )
