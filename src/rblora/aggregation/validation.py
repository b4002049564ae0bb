"""Input checks for :func:`rblora.aggregation.aggregate`; every error names client and module."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .types import ClientUpdate


def validate_updates(updates: Sequence[ClientUpdate]) -> dict[str, tuple[int, int]]:
    """Check a list of client updates; return module -> ``(d_out, d_in)``.

    Raises:
        ValueError: empty list, a non-:class:`ClientUpdate`, ``num_examples`` < 1, ``lora_alpha``
            <= 0, no modules, module sets that differ, non-2-D or non-float factors, A/B rank
            disagreement, rank outside ``1..min(d_in, d_out)``, ``d_in``/``d_out`` that differ
            from the first client's, NaN or inf values.
    """
    if not isinstance(updates, Sequence) or isinstance(updates, str):
        raise ValueError(f"updates must be a list of ClientUpdate, got {type(updates).__name__}")
    if len(updates) == 0:
        raise ValueError("no client updates to aggregate (empty list); pass at least one")
    shapes, dense_shapes = first_shapes(updates[0], 0)
    for i, u in enumerate(updates):
        validate_update(u, i, shapes, dense_shapes)
    return shapes


def first_shapes(
    u: ClientUpdate, index: int
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, ...]]]:
    """The module and dense shapes the first update of a round sets (checked as it is read)."""
    if not isinstance(u, ClientUpdate):
        raise ValueError(f"client {index}: expected a ClientUpdate, got {type(u).__name__}")
    who = u.describe(index)
    _check_scalars(u, who)
    shapes = {module: _check_factors(u, module, who, None) for module in sorted(u.factors)}
    _check_dense(u, u.dense, who)
    return shapes, {n: tuple(t.shape) for n, t in u.dense.items()}


def validate_update(
    u: ClientUpdate,
    index: int,
    shapes: dict[str, tuple[int, int]],
    dense_shapes: dict[str, tuple[int, ...]],
) -> None:
    """Check one update against the round's module ``shapes`` and dense extras' shapes (the
    first update's, or the server's own); ValueError naming the client (``index``) and what is
    wrong."""
    if not isinstance(u, ClientUpdate):
        raise ValueError(f"client {index}: expected a ClientUpdate, got {type(u).__name__}")
    who = u.describe(index)
    _check_scalars(u, who)
    _check_dense(u, dense_shapes, who)
    missing = sorted(set(shapes) - set(u.factors))
    extra = sorted(set(u.factors) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"{who}: module set differs from client 0's: missing {missing}, unexpected {extra}"
        )
    for module in shapes:
        _check_factors(u, module, who, shapes[module])


def _check_scalars(u: ClientUpdate, who: str) -> None:
    n = u.num_examples
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{who}: num_examples must be an integer >= 1, got {n!r}")
    a = u.lora_alpha
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a <= 0:
        raise ValueError(f"{who}: lora_alpha must be a finite number > 0, got {a!r}")
    if not hasattr(u.factors, "keys") or (len(u.factors) == 0 and not u.dense):
        raise ValueError(
            f"{who}: factors must be a non-empty mapping module -> (A, B) (they may be empty "
            "only when dense parameters are trained instead)"
        )


def _check_factors(
    u: ClientUpdate, module: str, who: str, expected: tuple[int, int] | None
) -> tuple[int, int]:
    """Check one module's ``(A: (r, d_in), B: (d_out, r))``; return ``(d_out, d_in)``."""
    where = f"{who}, module {module!r}"
    pair = u.factors[module]
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise ValueError(f"{where}: factors must be a pair (A, B), got {type(pair).__name__}")
    for name, t in zip("AB", pair, strict=True):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else type(t)
            raise ValueError(f"{where}: {name} must be a 2-D floating-point tensor, got {desc}")
    a, b = pair
    r, d_in = a.shape
    d_out, r_b = b.shape
    if r != r_b:
        raise ValueError(
            f"{where}: A has rank {r} (shape {tuple(a.shape)}) but B has rank {r_b} "
            f"(shape {tuple(b.shape)}); expected A: (r, d_in), B: (d_out, r)"
        )
    if expected is not None and (d_out, d_in) != expected:
        raise ValueError(
            f"{where}: (d_out, d_in) = {(d_out, d_in)} differs from client 0's {expected}"
        )
    if not 1 <= r <= min(d_in, d_out):
        limit = min(d_in, d_out)
        raise ValueError(f"{where}: rank {r} is outside 1..min(d_in, d_out) = 1..{limit}")
    for name, t in zip("AB", pair, strict=True):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} contains NaN or inf values")
    return d_out, d_in


def _check_dense(u: ClientUpdate, expected, who: str) -> None:
    """Dense extras: a mapping of finite floating tensors with the ``expected`` names and shapes
    (client 0's)."""
    if not hasattr(u.dense, "keys"):
        raise ValueError(f"{who}: dense must be a mapping name -> tensor")
    missing = sorted(set(expected) - set(u.dense))
    extra = sorted(set(u.dense) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{who}: dense parameters differ from client 0's: missing {missing}, unexpected {extra}"
        )
    for name, t in u.dense.items():
        where = f"{who}, dense parameter {name!r}"
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{where}: must be a floating-point tensor")
        want = tuple(expected[name].shape) if torch.is_tensor(expected[name]) else expected[name]
        if tuple(t.shape) != tuple(want):
            raise ValueError(
                f"{where}: shape {tuple(t.shape)} differs from client 0's {tuple(want)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: contains NaN or inf values")
