"""The one pair of factors every client's start adapter is cut from (svd and truncate).

Under the ``svd`` and ``truncate`` redistributions a client of rank ``r`` and PEFT scale ``s_r``
starts its next round from ``A = A_W[:r]``, ``B = B_W[:, :r] / s_r``: prefixes of one pair of
factors ``(A_W: (W, d_in), B_W: (d_out, W))`` per module, the scale folded into ``B_W`` (the
SVD's ``V^T`` and ``U diag(sigma)``, or the padded global factors), ``W`` the largest rank served.
Where the update has fewer than ``W`` components the last rows of ``A_W`` are orthonormal to the
others and the matching columns of ``B_W`` are zero, so a wider client gets trainable directions
that leave its delta unchanged.

:class:`StartBasis` holds that pair once, so a server keeps (and checkpoints) ``W`` components
per module instead of ``sum_k r_k``: for the seed's ranks (4,4,16,16,64,64,128,128,256,256),
256 instead of 936. :meth:`StartBasis.for_client` is the only function that cuts a start from
it, on the round it is computed and after a resume alike, so both give bitwise the same tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .types import FactorPair, Factors, lora_scale


@dataclass(frozen=True, eq=False)
class StartBasis:
    """Per module, the factors every client's start adapter is a prefix of.

    Built by :meth:`rblora.aggregation.GlobalUpdate.start_basis`. Its tensors are its own (never
    views of the global update's) and are never modified.
    """

    width: int
    """``W``: the largest rank it serves."""
    factors: dict[str, FactorPair]
    """Module -> ``(A_W: (W, d_in), B_W: (d_out, p))`` with ``p <= W`` and the scale folded into
    ``B_W``; columns ``p .. W`` of ``B_W`` are zero and not stored (``p`` is the number of
    components the update has, when that is less than ``W``)."""
    dtype: torch.dtype
    """dtype of the start adapters (the clients' dtype; the factors may be in a wider one)."""

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"start basis: width must be an integer >= 1, got {self.width!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"start basis: dtype must be a torch.dtype, got {self.dtype!r}")
        for module, (a, b) in self.factors.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.width or b.shape[1] > self.width:
                raise ValueError(
                    f"start basis: module {module!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"width {self.width} needs A with {self.width} rows and B with at most "
                    f"{self.width} columns"
                )

    def for_client(self, rank: int, lora_alpha: float, use_rslora: bool = False) -> Factors:
        """The start adapter of a client of rank ``rank``: module -> ``(A: (rank, d_in),
        B: (d_out, rank))``, raw PEFT factors (``lora_scale(lora_alpha, rank, use_rslora)`` is
        divided out of B). New tensors in :attr:`dtype`."""
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ValueError(f"start basis: rank must be an integer, got {rank!r}")
        if not 1 <= rank <= self.width:
            raise ValueError(f"start basis: rank {rank} is outside 1..{self.width}")
        ok = isinstance(lora_alpha, numbers.Real) and math.isfinite(lora_alpha)
        if not (ok and lora_alpha > 0):
            raise ValueError(f"start basis: lora_alpha must be finite and > 0, got {lora_alpha!r}")
        scale = lora_scale(lora_alpha, int(rank), use_rslora)
        return {m: _cut(a, b, int(rank), scale, self.dtype) for m, (a, b) in self.factors.items()}

    def factor(self, name: str, module: str, count: int, size: int) -> Tensor:
        """The first ``count`` components of ``module``'s factor ``name`` as the aggregation
        holds it (a held factor, :class:`~.types.ClientProtocol`): ``A: (count, size)`` or, scale
        folded in, ``B: (size, count)`` (zero columns beyond the stored ones). A new tensor."""
        a_w, b_w = self.factors[module]
        if count > self.width:
            raise ValueError(f"start basis: {count} components asked, width {self.width}")
        if name == "A":
            return a_w[:count].clone()
        out = b_w.new_zeros(b_w.shape[0], count)
        have = min(count, b_w.shape[1])
        out[:, :have] = b_w[:, :have]
        return out


def _cut(a_w: Tensor, b_w: Tensor, rank: int, scale: float, dtype: torch.dtype) -> FactorPair:
    """``(A_W[:rank], B_W[:, :rank] / scale)`` in ``dtype``, B zero-padded to ``rank`` columns.

    Elementwise after the slice, so a client's start does not depend on ``W``."""
    b = b_w[:, :rank] / scale
    if b.shape[1] < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a_w[:rank].to(dtype, copy=True), b.to(dtype)
