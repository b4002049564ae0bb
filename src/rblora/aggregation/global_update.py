"""The result of one aggregation: the global update, and the adapters sent back to clients."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .linalg import FactoredSVD, energy_rank, orthonormal_complement_rows, randomized_svd
from .starts import StartBasis
from .types import DEFAULT_SVD_ENERGY, FactorPair, ModuleDelta, check_svd_energy


class GlobalUpdate:
    """The aggregated update of every module, held in exact factored form.

    For each module the update is ``dW = B_g @ A_g`` with ``A_g: (k, d_in)``, ``B_g: (d_out, k)``
    and all client scales already folded in (``k`` is R for HETLoRA, S = sum r_k for the stacks),
    or a dense ``(d_out, d_in)`` tensor: a stack wider than the matrix (summed as the replies
    came, :mod:`.streaming`), whose ``svd`` redistribution is the exact dense SVD, or an update
    to which client-level DP added full-rank noise (:mod:`.privacy`, ``noised``), whose ``svd``
    redistribution is a seeded randomized range finder to the width asked
    (:func:`.linalg.randomized_svd`).

    Attributes:
        method: canonical name of the method that produced it.
        reduction: ``"svd"``, ``"truncate"``, ``"merge"`` or ``"threshold"`` (how
            :meth:`for_client` redistributes).
        modules: sorted module names.

    Tensors returned by any method are new (safe to modify) and in the clients' dtype.
    """

    def __init__(
        self,
        method: str,
        reduction: str,
        factors: dict[str, ModuleDelta],
        dtype: torch.dtype,
        dense: dict[str, Tensor] | None = None,
        sketch_seed: int = 0,
        noised: bool = False,
        svd_energy: float = DEFAULT_SVD_ENERGY,
        residual: dict[str, ModuleDelta] | None = None,
    ) -> None:
        """``factors``: module -> ``(A_g: (k, d_in), B_g: (d_out, k))`` (or a dense
        ``(d_out, d_in)``) in the working dtype; ``dtype``: the dtype of returned tensors;
        ``dense``: the averaged dense extra parameters; ``sketch_seed``: seeds the random test
        matrices of the randomized SVD of dense modules; ``svd_energy``: the fraction of each
        module's energy the ``threshold`` redistribution keeps; ``residual``: module -> the part
        of the update the driver folds into the base weights beside ``factors`` (FedEx-LoRA),
        factored or dense. Built by
        :func:`rblora.aggregation.aggregate` (or :func:`.privacy.private_aggregate`)."""
        self.dense: dict[str, Tensor] = dict(dense or {})
        """Example-weighted mean of the clients' dense extra parameters (every client starts its
        next round from them, whatever the redistribution)."""
        self.method = method
        self.reduction = reduction
        self.modules: list[str] = sorted(factors)
        self._factors = factors
        self._dtype = dtype
        self._sketch_seed = int(sketch_seed)
        self.noised = noised
        """True if DP noise was added: a dense module is full rank, cut by the range finder."""
        self.svd_energy = check_svd_energy(svd_energy)
        """``threshold``: the fraction of each module's energy its start components keep."""
        self._residual: dict[str, ModuleDelta] = dict(residual or {})
        self._svd: dict[str, FactoredSVD] = {}
        self._sketches: dict[tuple[str, int], FactorPair] = {}  # (dense module, width) -> SVD
        self.kept: dict[str, int] = {}
        """``threshold``: module -> the most components a start held, the thresholded rank
        ``k`` where a client of rank >= k asked (filled as clients' starts are built; the
        round's record reports it)."""

    def __repr__(self) -> str:
        return (
            f"GlobalUpdate(method={self.method!r}, reduction={self.reduction!r}, "
            f"modules={len(self.modules)})"
        )

    @property
    def merges_into_base(self) -> bool:
        """True for the ``merge`` protocol (FLoRA): the driver adds :meth:`factors`' product into
        the frozen base weights and every client restarts from a fresh LoRA, so
        :meth:`for_client` returns ``{}``."""
        return self.reduction == "merge"

    @property
    def folds_residual(self) -> bool:
        """True if part of the update goes into the base weights while clients start from the
        factors (FedEx-LoRA): the driver adds :meth:`residual` to the base, and the global
        model is the base plus :meth:`factors`' product (:meth:`delta` is their sum)."""
        return bool(self._residual)

    def residual(self, module: str) -> ModuleDelta:
        """The part of ``module``'s update folded into the base weights: ``(A, B)`` (scale
        folded in) or a dense ``(d_out, d_in)``, new tensors; ValueError if there is none."""
        self._get(module)
        if module not in self._residual:
            raise ValueError(f"this {self.method} update folds no residual into the base")
        value = self._residual[module]
        if isinstance(value, Tensor):
            return value.to(self._dtype, copy=True)
        return value[0].to(self._dtype, copy=True), value[1].to(self._dtype, copy=True)

    def is_dense(self, module: str) -> bool:
        """True if ``module`` is held as a dense ``(d_out, d_in)`` (a wide stack, or DP noise)."""
        return isinstance(self._get(module), Tensor)

    def shape(self, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of ``module``."""
        if self.is_dense(module):
            return tuple(int(d) for d in self._get(module).shape)
        a, b = self._get(module)
        return int(b.shape[0]), int(a.shape[1])

    def rank(self, module: str) -> int:
        """Width ``k`` of the factored form of ``module`` (R for HETLoRA, S for stacks,
        ``min(d_out, d_in)`` when dense); the numerical rank of the update may be lower."""
        if self.is_dense(module):
            return min(self.shape(module))
        return int(self._get(module)[0].shape[0])

    def factors(self, module: str) -> FactorPair:
        """Exact factored form ``(A: (k, d_in), B: (d_out, k))`` with ``delta == B @ A`` (scale
        folded in: export it as a PEFT adapter with ``lora_alpha == k``, or merge it). A dense
        module is ``(I, dW)`` when ``d_in <= d_out``, else ``(dW, I)``
        (``k = min(d_out, d_in)``)."""
        a, b = self._get_factors(module)
        return a.to(self._dtype, copy=True), b.to(self._dtype, copy=True)

    def module_delta(self, module: str) -> ModuleDelta:
        """The update of ``module`` as held: :meth:`factors`, or a new dense ``(d_out, d_in)``."""
        if self.is_dense(module):
            return self._get(module).to(self._dtype, copy=True)
        return self.factors(module)

    def delta(self, module: str) -> Tensor:
        """Dense global update ``(d_out, d_in)`` of ``module``, scaling included (and the
        residual folded into the base, if any: the whole update)."""
        if self.is_dense(module):
            out = self._get(module).clone()
        else:
            a, b = self._get(module)
            out = b @ a
        extra = self._residual.get(module)
        if extra is not None:
            out = out + (extra if isinstance(extra, Tensor) else extra[1] @ extra[0]).to(out)
        return out.to(self._dtype)

    @torch.no_grad()
    def for_client(
        self, rank: int, lora_alpha: float, use_rslora: bool = False
    ) -> dict[str, FactorPair]:
        """The rank-``rank`` adapter a client starts its next round from.

        Returns module -> ``(A: (rank, d_in), B: (d_out, rank))`` such that the PEFT delta
        ``lora_scale(lora_alpha, rank, use_rslora) * B @ A`` is the redistributed update:

        - ``svd``: the best rank-``rank`` approximation of :meth:`delta` (one decomposition per
          module, computed on first use and shared by all later calls);
        - ``truncate``: the first ``rank`` components of the factored form;
        - ``merge``: ``{}`` -- the update goes into the base weights, the client starts fresh.

        When ``rank`` exceeds the components available, the extra rows of A are orthonormal to
        the others and the extra columns of B are zero: the delta is unchanged and the new
        components are trainable, as in a fresh LoRA. Cut from :meth:`start_basis` of width
        ``rank``; a server serving many ranks builds the basis once for the largest.
        """
        self._check_request(rank, lora_alpha)
        if self.merges_into_base:
            return {}
        return self.start_basis(int(rank)).for_client(int(rank), lora_alpha, use_rslora)

    @torch.no_grad()
    def start_basis(self, width: int) -> StartBasis | None:
        """The factors every client of rank ``<= width`` starts from a prefix of (see
        :mod:`.starts`): per module ``(A_W: (width, d_in), B_W: (d_out, p))``, ``p <= width``,
        in the working dtype; None under ``merge``.

        ``svd``: ``A_W = V[:, :width]^T``, ``B_W = U[:, :width] diag(sigma[:width])``;
        ``truncate``: the first ``width`` components of the factored form; either way completed
        by orthonormal rows of A (and zero columns of B, not stored) if the update has fewer.
        """
        if self.merges_into_base:
            return None
        self._check_request(width, 1.0)
        width = int(width)
        factors = {m: self._basis_factors(m, width) for m in self.modules}
        return StartBasis(width, factors, self._dtype)

    def _dense_basis(self, module: str, width: int) -> FactorPair:
        """Top-``width`` SVD factors of a dense module: the exact dense SVD, or for a noised
        update a randomized range finder seeded from ``sketch_seed`` and the module's index (so
        the same update gives the same factors)."""
        if self.reduction not in ("svd", "threshold"):
            raise ValueError(
                f"module {module!r} is dense: only the svd redistribution can cut it to a "
                f"client's rank, not {self.reduction!r}"
            )
        if not self.noised:
            if module not in self._svd:
                self._svd[module] = FactoredSVD(*self._get_factors(module))
            svd = self._svd[module]
            return svd.truncated(min(width, svd.width))
        if (module, width) not in self._sketches:
            index = self.modules.index(module)
            seed = (self._sketch_seed * 1_000_003 + index) % 2**63
            generator = torch.Generator().manual_seed(seed)
            self._sketches[module, width] = randomized_svd(
                self._get(module), width, generator=generator
            )
        return self._sketches[module, width]

    def kept_rank(self, module: str, width: int | None = None) -> int:
        """``threshold``: the rank ``k`` FLoRIST keeps on ``module``, the smallest with
        ``sigma_1^2 + ... + sigma_k^2 >= svd_energy * ||dW||_F^2`` (:func:`.linalg.energy_rank`);
        every client of rank r starts from its first ``min(k, r)`` SVD components. For a
        DP-noised module the singular values come from the range finder of ``width``
        components (default: all), and ``k`` is at most ``width``."""
        if self.is_dense(module) and self.noised:
            width = min(self.shape(module)) if width is None else width
            sigma = self._dense_basis(module, width)[1].norm(dim=0)  # B_W = U diag(sigma)
            total = float(self._get(module).double().square().sum())
            return energy_rank(sigma, self.svd_energy, total)
        if module not in self._svd:
            self._svd[module] = FactoredSVD(*self._get_factors(module))
        return energy_rank(self._svd[module].sigma, self.svd_energy)

    def _get_factors(self, module: str) -> FactorPair:
        """:meth:`factors` in the working dtype (no copy of a factored module)."""
        value = self._get(module)
        if not isinstance(value, Tensor):
            return value
        d_out, d_in = value.shape
        eye = torch.eye(min(d_out, d_in), dtype=value.dtype)
        return (eye, value) if d_in <= d_out else (value, eye)

    def _get(self, module: str) -> ModuleDelta:
        if module not in self._factors:
            raise ValueError(f"unknown module {module!r}; this update has {self.modules}")
        return self._factors[module]

    def _check_request(self, rank: int, lora_alpha: float) -> None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"for_client: rank must be an integer >= 1, got {rank!r}")
        for m in self.modules:
            limit = min(self.shape(m))
            if rank > limit:
                raise ValueError(
                    f"for_client: rank {rank} exceeds min(d_out, d_in) = {limit} of module {m!r}"
                )
        ok = isinstance(lora_alpha, numbers.Real) and math.isfinite(lora_alpha)
        if not (ok and lora_alpha > 0):
            raise ValueError(f"for_client: lora_alpha must be finite and > 0, got {lora_alpha!r}")

    def _basis_factors(self, module: str, width: int) -> FactorPair:
        """``(A_W: (width, d_in), B_W: (d_out, p))``, new contiguous tensors (not views of the
        factors or of the SVD cache, so the basis keeps nothing else alive)."""
        if self.is_dense(module):
            a, b = self._dense_basis(module, width)
        elif self.reduction in ("svd", "threshold"):
            if module not in self._svd:
                self._svd[module] = FactoredSVD(*self._get(module))
            svd = self._svd[module]
            a, b = svd.truncated(min(width, svd.width))
        else:
            a_g, b_g = self._get(module)
            a, b = a_g[:width], b_g[:, :width]
        if self.reduction == "threshold":  # FLoRIST: the module's thresholded rank, at most
            keep = self.kept_rank(module, width)
            a, b = a[: min(keep, len(a))], b[:, : min(keep, b.shape[1])]
            self.kept[module] = max(self.kept.get(module, 0), len(a))
        if a.shape[0] < width:
            a = torch.cat([a, orthonormal_complement_rows(a, width - a.shape[0])], dim=0)
        own = torch.contiguous_format
        return a.clone(memory_format=own), b.clone(memory_format=own)
