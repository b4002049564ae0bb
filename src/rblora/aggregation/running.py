"""An exact running sum of global updates, for protocols that merge each round into the base.

Under the merge protocol (FLoRA) round t's global update ``dW_t`` goes into the frozen base, so
the model after round t is ``W0 + D_t`` with ``D_t = dW_1 + ... + dW_t``. :class:`UpdateSum`
holds ``D_t`` per module in whichever exact form is smaller:

- factored, ``(A: (k, d_in), B: (d_out, k))`` with ``D = B @ A`` in SVD form: ``A = V^T`` has
  orthonormal rows, ``B = U diag(sigma)`` orthogonal columns, ``k`` the numerical rank of ``D``.
  Adding ``dW = B' @ A'`` stacks the factors and re-factors the stack (a factored SVD: QR of
  each side, SVD of the small core; :class:`rblora.aggregation.linalg.FactoredSVD`);
- dense, ``(d_out, d_in)``: once ``k * (d_in + d_out) >= d_in * d_out`` the product is formed once
  and later updates are added to it.

Why the SVD form and not the stack: under FLoRA's merge protocol every client receives the total,
and a stack ``[p_1 A_1; ...]``, ``[s_1 B_1 ...]`` would hand every client every other client's
own update block by block. The SVD form carries the same sum (to float32 rounding) and only the
sum: its directions mix every client's. It is also the smallest exact factored form (directions
that cancel out are dropped).

So its size never exceeds one dense matrix per module, however many rounds run (keeping every
round's stack would grow by ``sum r_k * (d_in + d_out)`` numbers per module per round: about
1.6 GB a round for Llama-3.1-8B with the seed's ranks). Everything is float32 on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import FactoredSVD
from .types import FactorPair, ModuleDelta


def is_dense(delta: ModuleDelta) -> bool:
    """True for a dense ``(d_out, d_in)`` delta, False for a factor pair ``(A, B)``."""
    return isinstance(delta, Tensor)


def delta_shape(delta: ModuleDelta) -> tuple[int, int]:
    """``(d_out, d_in)`` of a dense or factored delta."""
    if is_dense(delta):
        return int(delta.shape[0]), int(delta.shape[1])
    a, b = delta
    return int(b.shape[0]), int(a.shape[1])


class UpdateSum:
    """Exact sum of factored updates, per module, dense where that is smaller (see module doc)."""

    def __init__(self) -> None:
        self._modules: dict[str, ModuleDelta] = {}

    def __bool__(self) -> bool:
        return bool(self._modules)

    def items(self):
        """``(module, delta)`` pairs, sorted; a delta is ``(A, B)`` or a dense tensor."""
        return sorted(self._modules.items())

    def as_dict(self) -> dict[str, ModuleDelta]:
        return dict(self.items())

    @torch.no_grad()
    def add(self, update: dict[str, ModuleDelta]) -> None:
        """Add every module of ``update``: ``B @ A`` of factors (scale folded in), or a dense
        ``(d_out, d_in)`` (a DP-noised update; the total is dense from then on)."""
        for module, value in update.items():
            current = self._modules.get(module)
            if is_dense(value):
                value = value.detach().to("cpu", torch.float32)
                if current is not None and delta_shape(current) != tuple(value.shape):
                    raise ValueError(
                        f"UpdateSum.add: {module}: shape {tuple(value.shape)} differs from "
                        f"the running total's {delta_shape(current)}"
                    )
                if current is None:
                    self._modules[module] = value.clone()
                elif is_dense(current):
                    self._modules[module] = current + value
                else:
                    self._modules[module] = current[1] @ current[0] + value
                continue
            a = value[0].detach().to("cpu", torch.float32)
            b = value[1].detach().to("cpu", torch.float32)
            if current is None:
                total: ModuleDelta = (a.clone(), b.clone())
            elif is_dense(current):
                total = current + b @ a
            else:
                if delta_shape(current) != (b.shape[0], a.shape[1]):
                    raise ValueError(
                        f"UpdateSum.add: {module}: shape {(b.shape[0], a.shape[1])} differs from "
                        f"the running total's {delta_shape(current)}"
                    )
                total = (torch.cat([current[0], a]), torch.cat([current[1], b], dim=1))
            self._modules[module] = _compact(total)

    @classmethod
    def from_dict(cls, deltas: dict[str, ModuleDelta]) -> UpdateSum:
        """A running total holding ``deltas`` as they are (e.g. read from a checkpoint)."""
        total = cls()
        total._modules = dict(deltas)
        return total


def _compact(delta: ModuleDelta) -> ModuleDelta:
    """The smaller exact form: SVD factors while ``k * (d_in + d_out) < d_in * d_out``, else
    dense."""
    if is_dense(delta):
        return delta
    a, b = delta
    d_out, d_in = delta_shape(delta)
    if a.shape[0] * (d_in + d_out) >= d_in * d_out:
        return b @ a
    return svd_factors(a, b)


def svd_factors(a: Tensor, b: Tensor) -> FactorPair:
    """``B @ A`` re-factored as ``(V^T, U diag(sigma))`` at its numerical rank (at least 1):
    singular values at or below ``max(d_out, d_in, k) * eps(float32) * sigma_max`` (the usual
    numerical-rank cut-off, as ``torch.linalg.matrix_rank``'s) are rounding, not directions.
    A cut-off relative to the factors' norms instead would drop real directions of a stack
    whose clients' scales differ 64x. ``A: (k, d_in)``, ``B: (d_out, k)`` float32; returns
    float32, signs fixed."""
    svd = FactoredSVD(a, b)
    tol = max(b.shape[0], a.shape[1], a.shape[0]) * torch.finfo(a.dtype).eps * float(svd.sigma[0])
    rank = max(1, int((svd.sigma > tol).sum()))
    return svd.truncated(min(rank, svd.width))


def orthonormal_form(delta: ModuleDelta) -> FactorPair:
    """``delta`` (factored or dense) as float32 ``(A: (k, d_in), B: (d_out, k))`` with
    ``B @ A == delta`` to float32 rounding and A's rows orthonormal: the form a global update is
    handed out in.

    Factored: its SVD form at its numerical rank, at most the factors' width (:func:`svd_factors`,
    a factored SVD that never forms the matrix). Never the factors as they are: a block of a
    stack is one client's factors, attributable by its position and rank. Dense (a DP-noised
    update, a running total that went dense; full rank): ``(Q^T, R^T)`` from a QR of ``dW^T``
    when ``d_out <= d_in`` (``dW = R^T Q^T``), else ``(I, dW)``; rank ``min(d_out, d_in)``, at the
    cost of a QR rather than a dense SVD (about two minutes per 4096 x 4096 module on 2 CPU
    cores)."""
    if not is_dense(delta):
        a, b = svd_factors(delta[0].detach().float(), delta[1].detach().float())
    else:
        dense = delta.detach().float()
        d_out, d_in = dense.shape
        if d_out <= d_in:
            q, r = torch.linalg.qr(dense.T)
            a, b = q.T, r.T
        else:
            a, b = torch.eye(d_in, dtype=dense.dtype, device=dense.device), dense
    return a.float().contiguous(), b.float().contiguous()
