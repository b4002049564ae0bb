"""Linear algebra on factored updates ``B @ A``: padding, stacking, factored SVD.

Nothing here forms a ``(d_out, d_in)`` matrix unless the factored form is at least as wide as the
matrix (then the dense SVD is cheaper anyway).

Precision: the big Householder QRs run in the factors' working dtype (float32 normally); the small
``k x k`` core and its SVD run in float64. On Llama-3.1-8B shapes (k = 928) this keeps the
projection's relative Frobenius error against a float64 dense truncated SVD near 3e-6, whereas an
all-float32 pipeline reaches 4e-5, too close to the 1e-4 bar. The dense path runs in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def padded_component_sum(
    As: Sequence[Tensor], Bhs: Sequence[Tensor], gamma: Tensor
) -> tuple[Tensor, Tensor]:
    """Weighted sum of zero-padded factors, weighting each component separately.

    Args:
        As: client k's ``A_k: (r_k, d_in)``.
        Bhs: client k's ``Bh_k: (d_out, r_k)`` (scale folded in).
        gamma: ``(K, R)`` weights, ``R = max r_k``; ``gamma[k, j]`` weighs row j of ``A_k`` and
            column j of ``Bh_k`` (entries with ``j >= r_k`` are ignored).

    Returns:
        ``(A_g: (R, d_in), B_g: (d_out, R))`` with ``A_g[j] = sum_k gamma[k, j] A_k[j]`` and
        ``B_g[:, j] = sum_k gamma[k, j] Bh_k[:, j]``.
    """
    rank = int(gamma.shape[1])
    a_g = As[0].new_zeros(rank, As[0].shape[1])
    b_g = Bhs[0].new_zeros(Bhs[0].shape[0], rank)
    for k, (a, bh) in enumerate(zip(As, Bhs, strict=True)):
        r = a.shape[0]
        w = gamma[k, :r].to(a)
        a_g[:r] += w[:, None] * a
        b_g[:, :r] += bh * w[None, :]
    return a_g, b_g


def held_rows(
    As: Sequence[Tensor],
    width: int,
    held: Tensor | None = None,
    who: Sequence[str] | None = None,
    rtol: float = 0.0,
    what: str = "frozen A",
) -> Tensor:
    """The one matrix every client's frozen A is a prefix of, ``(width, d_in)``: the widest
    ``A_k`` (or ``held``, rows found earlier), zero rows beyond. A new tensor. Also serves a
    held B, transposed (``Bh^T``), whose scale-folded copies agree to ``rtol`` only.

    Raises:
        ValueError: an ``A_k`` that is not, bitwise (or to ``rtol``), the first ``r_k`` rows of
            the others (the clients do not share one frozen initialisation), named by
            ``who[k]`` (default ``client k``); ``what`` names the factor in the message.
    """

    def same(x: Tensor, y: Tensor) -> bool:
        y = y.to(x.dtype)
        return torch.equal(x, y) if rtol == 0 else torch.allclose(x, y, rtol=rtol, atol=0.0)

    known = ([] if held is None else [held]) + list(As)
    widest = max(known, key=len)
    for k, a in enumerate(As):
        if not same(a, widest[: a.shape[0]]) or not same(
            known[0][: a.shape[0]], a[: known[0].shape[0]]
        ):
            label = f"client {k}" if who is None else who[k]
            raise ValueError(
                f"{label}: its {what} is not the shared one every client holds a prefix of "
                "(a method that holds a factor fixed averages the other only: give every client "
                "the first r_k components of one matrix)"
            )
    held = widest
    out = held.new_zeros(width, held.shape[1])
    rows = min(width, held.shape[0])
    out[:rows] = held[:rows]
    return out


def weighted_stack(
    As: Sequence[Tensor], Bhs: Sequence[Tensor], gamma: Tensor
) -> tuple[Tensor, Tensor]:
    """Stack all clients' components, weighting each rank-one component.

    Args: as :func:`padded_component_sum`.

    Returns:
        ``(A_s: (S, d_in), B_s: (d_out, S))``, ``S = sum r_k``, with
        ``B_s @ A_s = sum_k sum_{j < r_k} gamma[k, j] * Bh_k[:, j] A_k[j]`` (weights on the rows
        of A, clients in the given order).
    """
    rows = [gamma[k, : a.shape[0]].to(a)[:, None] * a for k, a in enumerate(As)]
    return torch.cat(rows, dim=0), torch.cat(list(Bhs), dim=1)


def orthonormal_complement_rows(rows: Tensor, count: int) -> Tensor:
    """``count`` orthonormal rows, each orthogonal to every row of ``rows``.

    Args:
        rows: ``(k, d)`` with ``k + count <= d``.

    Returns:
        ``(count, d)``: rows ``k .. k+count`` of the complete orthogonal factor of a Householder QR
        of ``rows^T``. Deterministic; the complement is exact even if ``rows`` is rank-deficient.
    """
    k, d = rows.shape
    if k + count > d:
        raise ValueError(f"cannot add {count} orthonormal rows to {k} rows of length {d}")
    reflectors, tau = torch.geqrf(rows.T.contiguous())
    picks = rows.new_zeros(d, count)
    picks[k : k + count] = torch.eye(count, dtype=rows.dtype, device=rows.device)
    return torch.ormqr(reflectors, tau, picks).T.contiguous()


def energy_rank(sigma: Tensor, energy: float, total: float | None = None) -> int:
    """FLoRIST's thresholded rank: the smallest ``k >= 1`` with
    ``sigma_1^2 + ... + sigma_k^2 >= energy * total``, ``total`` the update's whole energy
    (default ``sum sigma^2``; give ``||dW||_F^2`` when ``sigma`` holds only the top values).
    ``len(sigma)`` when the values given do not reach it.

    Source: Ramesh, Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate
    Federated Fine-Tuning of Large Language Models" (MLSys 2026, arXiv 2506.09199): the SVD of
    the stacked client adapters is computed in the compact space of the stacks (what
    :class:`FactoredSVD` does), and "tunable singular value thresholding" picks one rank per
    module for the global adapters every client receives. The authors' code (the repository its
    README calls the official implementation) reads the energy as here, squared singular values
    against their whole sum, one ``k`` per module (we could not read the paper's own text beyond
    its abstract)."""
    squares = sigma.double().square()
    whole = float(squares.sum()) if total is None else float(total)
    reached = torch.nonzero(squares.cumsum(0) >= energy * whole).flatten()
    return int(reached[0]) + 1 if len(reached) else max(1, len(sigma))


def _fix_signs(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so the largest-magnitude entry of each ``u`` column is positive.

    ``u: (d_out, r)``, ``v: (d_in, r)``; returns new tensors.
    """
    idx = u.abs().argmax(dim=0, keepdim=True)
    sign = torch.sign(torch.gather(u, 0, idx))
    sign[sign == 0] = 1
    return u * sign, v * sign


class FactoredSVD:
    """Thin SVD of ``B @ A`` computed from the factors, for rank-r projections.

    ``A: (k, d_in)``, ``B: (d_out, k)``. If ``k < min(d_out, d_in)``: Householder QR of ``B``
    and of ``A^T`` (``B = Q_B R_B``, ``A^T = Q_A R_A``), SVD of the ``k x k`` core
    ``R_B R_A^T = U_c diag(sigma) V_c^T``, so ``B @ A = (Q_B U_c) diag(sigma) (Q_A V_c)^T``; the
    orthogonal factors are applied implicitly (never formed) and only to the columns asked for.
    Otherwise: a float64 dense SVD of ``B @ A``. No Gram matrix is formed anywhere.

    The decomposition is computed once, on construction; singular vectors are materialised lazily
    for the largest rank asked so far and cached in this object.
    """

    def __init__(self, A: Tensor, B: Tensor) -> None:
        k, d_in = A.shape
        d_out = B.shape[0]
        self.dtype = A.dtype
        self.width = min(k, d_out, d_in)
        """How many singular triplets exist."""
        self._dense = k >= min(d_out, d_in)
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None
        if self._dense:
            u, s, vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
            self.sigma = s
            self._cache = (*_fix_signs(u, vh.T), s)
            return
        self._qb = torch.geqrf(B.contiguous())
        self._qa = torch.geqrf(A.T.contiguous())
        core = self._qb[0][:k].triu().double() @ self._qa[0][:k].triu().double().T
        uc, s, vch = torch.linalg.svd(core)
        self.sigma = s
        """``(width,)`` singular values, descending, float64."""
        self._uc, self._vc = uc, vch.T

    def _vectors(self, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(U: (d_out, >= r), V: (d_in, >= r), sigma)``, sign-fixed, cached; a larger ``r``
        computes only the missing columns."""
        have = 0 if self._cache is None else self._cache[0].shape[1]
        if have >= r:
            return self._cache
        u, v = _fix_signs(
            self._apply(self._qb, self._uc[:, have:r]), self._apply(self._qa, self._vc[:, have:r])
        )
        if self._cache is not None:
            u, v = torch.cat([self._cache[0], u], dim=1), torch.cat([self._cache[1], v], dim=1)
        self._cache = (u, v, self.sigma)
        return self._cache

    def _apply(self, qr: tuple[Tensor, Tensor], small: Tensor) -> Tensor:
        """``Q @ small`` for the thin orthogonal factor ``Q: (d, k)`` of a Householder QR."""
        reflectors, tau = qr
        padded = reflectors.new_zeros(reflectors.shape[0], small.shape[1])
        padded[: small.shape[0]] = small.to(reflectors.dtype)
        return torch.ormqr(reflectors, tau, padded)

    def truncated(self, r: int) -> tuple[Tensor, Tensor]:
        """Best rank-r approximation in factored form (Eckart-Young).

        Args:
            r: ``1 <= r <= width``.

        Returns:
            ``(A_r: (r, d_in), B_r: (d_out, r))`` in the input dtype with
            ``A_r = V[:, :r]^T`` (orthonormal rows) and ``B_r = U[:, :r] diag(sigma[:r])``.
        """
        if not 1 <= r <= self.width:
            raise ValueError(f"rank {r} is outside 1..{self.width}")
        u, v, s = self._vectors(r)
        b = u[:, :r] * s[:r].to(u.dtype)
        return v[:, :r].T.to(self.dtype), b.to(self.dtype)


def randomized_svd(
    M: Tensor,
    rank: int,
    *,
    generator: torch.Generator,
    oversample: int = 10,
    power_iters: int = 4,
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation of a dense ``M: (d_out, d_in)`` in factored form, by a
    randomized range finder with subspace iteration (Halko, Martinsson & Tropp, SIAM Review 2011,
    Algorithm 4.4), for updates that are dense because noise was added to them.

    A Gaussian test matrix ``(d_in, rank + oversample)`` drawn from ``generator`` (so a seeded
    generator gives the same factors every time), ``power_iters`` rounds of re-orthonormalised
    subspace iteration, then an exact SVD of the small projected matrix in float64. Costs
    ``O(d_out * d_in * (rank + oversample) * (2 * power_iters + 2))`` instead of a dense SVD's
    ``O(d^3)`` (at 4096 x 4096 and rank 256: about a second instead of about two minutes on
    2 CPU cores). When ``rank + oversample >= min(d_out, d_in)`` the exact dense SVD (float64)
    is used instead. Its error against the dense SVD is measured in
    ``tests/aggregation/test_agg_privacy.py`` (docs/privacy.md).

    Returns:
        ``(A_r: (rank, d_in), B_r: (d_out, rank))`` in ``M``'s dtype, ``A_r = V[:, :rank]^T``
        with orthonormal rows, ``B_r = U[:, :rank] diag(sigma[:rank])``, signs fixed as in
        :class:`FactoredSVD`.
    """
    d_out, d_in = M.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} is outside 1..{min(d_out, d_in)}")
    width = rank + oversample
    if width >= min(d_out, d_in):
        u, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
    else:
        omega = torch.randn(d_in, width, generator=generator, dtype=M.dtype, device=M.device)
        q = torch.linalg.qr(M @ omega).Q
        for _ in range(power_iters):
            q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ q).Q).Q
        uc, s, vh = torch.linalg.svd((q.T @ M).double(), full_matrices=False)
        u = q.double() @ uc
    u, v = _fix_signs(u[:, :rank], vh[:rank].T)
    return v.T.to(M.dtype).contiguous(), (u * s[:rank]).to(M.dtype).contiguous()
