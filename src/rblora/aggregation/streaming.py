"""Aggregation as client updates arrive: running sums whose size does not grow with the clients.

    acc = RoundSum(get_method("RB-LoRA"), "svd", ranks=population_ranks)
    for update in replies:          # in any order; each can be freed once added
        acc.add(update)
    global_update = acc.finish()    # the same global update as aggregate(method, replies)

Every built-in method's weights factor as ``gamma[k, j] = raw[k, j] / den[j]`` with
``den[j] = sum_k mass[k, j]`` (:attr:`rblora.aggregation.types.Method.share`): the numerators are
sums over clients, and so are the denominators (RB-LoRA's are the examples behind component j,
a count). So a round folds each update into running sums and divides once at the end. What it
holds per module, whatever the number of clients:

- ``padded`` form: the numerators ``A: (R, d_in)``, ``B: (d_out, R)`` and ``den: (R,)``, with R
  the widest rank a client may have;
- ``stack`` form: the weighted stack of every client's components while its width is at most
  ``min(d_out, d_in)`` (what a list of the clients would hold anyway, and the exact factored
  form the SVD needs); once wider, one dense ``(d_out, d_in)`` sum per *band* of components that
  share a denominator: one band when the denominator is the same for every component (FLoRA,
  FlexLoRA), one per distinct rank of the population for RB-LoRA (its ``den[j]`` changes only
  where some client's rank ends). FLoRA's ``truncate`` needs the stack's order and keeps it;
- dense extras: one weighted sum each.

With ``normalise=False`` (client-level DP, :mod:`.privacy`) the caller gives each client's
weights (the population's fixed weights times its clip factor): nothing is divided at the end
and the padded width is the population's widest rank, whoever took part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .global_update import GlobalUpdate
from .linalg import held_rows
from .registry import resolve_reduction
from .types import (
    DEFAULT_SVD_ENERGY,
    ClientUpdate,
    HeldSource,
    Method,
    ModuleDelta,
    check_svd_energy,
)
from .validation import first_shapes, validate_update


class RoundSum:
    """The running sums of one round's aggregation (see the module doc).

    Args:
        method: the aggregation method; with ``normalise`` it must define ``share``.
        reduction: its redistribution (None: the method's default).
        ranks: the ranks the round's clients may have (the population's, or those of the list
            :func:`rblora.aggregation.aggregate` is given): they set the denominators' width,
            the stack's bands and (DP) the padded width. An update of another rank is refused.
        normalise: divide by the accumulated denominators at the end (False: the caller's
            weights are final, see :meth:`add`).
        shapes, dense_shapes: module -> ``(d_out, d_in)``, dense extra -> shape, if known before
            any update (a release with no client, under DP); else the first update's.
        held: where the round's fixed factors come from (:data:`.types.HeldSource`): the
            run's frozen initialisation (:class:`.frozen.FrozenInit`) for a frozen A or a held
            A before any global one exists, the server's start basis
            (:class:`.starts.StartBasis`) for a held factor; the global factor is then its
            first components, as wide as the sums (a frozen A of a client must be their
            prefix; a held factor of a client is not read). None: the widest client's copy,
            zero components beyond it.
        svd_energy: the ``threshold`` redistribution's energy (see
            :func:`rblora.aggregation.aggregate`).
        round_: the round (1-based) the updates belong to: the method's protocol of that round
            (``method.protocol.at(round_)``) says which factors are summed and which held.

    A fixed factor (:attr:`.types.ClientProtocol.fixed`: frozen or held) is held, never summed
    or weighted: every client's is a prefix of the same matrix, so with A fixed
    ``dW = B_g @ A`` with ``B_g`` the weighted sum of the clients' ``Bh_k``, and with B fixed
    ``dW = Bh @ A_g`` with ``A_g`` the weighted sum of the clients' ``A_k``.
    """

    def __init__(
        self,
        method: Method,
        reduction: str | None = None,
        *,
        ranks: Sequence[int],
        normalise: bool = True,
        shapes: Mapping[str, tuple[int, int]] | None = None,
        dense_shapes: Mapping[str, Sequence[int]] | None = None,
        held: HeldSource | None = None,
        svd_energy: float = DEFAULT_SVD_ENERGY,
        round_: int = 1,
    ) -> None:
        if normalise and method.share is None:
            raise ValueError(
                f"{method.name} defines no share (raw weight / mass), so its aggregation cannot "
                "be folded update by update; aggregate the round's list instead"
            )
        ranks = sorted({int(r) for r in ranks})
        if not ranks or ranks[0] < 1:
            raise ValueError(f"RoundSum: ranks {ranks} must be integers >= 1")
        if method.homogeneous_ranks:
            method.weights(ranks, [1] * len(ranks))  # its own error for mixed ranks
        self.method = method
        self.protocol = method.protocol.at(round_)
        """The method's client protocol of this round."""
        self.held_source = held
        """Where this round's fixed factors come from (None: the widest client's copy)."""
        self.svd_energy = check_svd_energy(svd_energy)
        self.reduction = resolve_reduction(method, reduction)
        self.normalise = normalise
        self.count = 0
        self._ranks = ranks
        self._shapes = (
            {m: (int(o), int(i)) for m, (o, i) in shapes.items()} if shapes is not None else None
        )
        self._dense_shapes = (
            {n: tuple(int(d) for d in s) for n, s in dense_shapes.items()}
            if dense_shapes is not None
            else None
        )
        self._dtype: torch.dtype | None = None  # promoted dtype of every factor added
        self._work = torch.float32
        self._widest = 0  # the widest rank added
        self._den = torch.zeros(ranks[-1], dtype=torch.float64)  # (R,) denominators
        self._dense_den = 0.0  # the dense extras' denominator (sum of examples)
        self._modules: dict[str, _ModuleSum] = {}
        self._stacks: dict[str, _ModuleSum] = {}  # a residual method's stack of the same weights
        self._extras: dict[str, Tensor] = {}
        self._ids: set = set()

    # ------------------------------------------------------------------ folding in
    def add(self, update: ClientUpdate, weights: Tensor | None = None, dense_weight=None) -> None:
        """Fold one client's update into the sums.

        ``weights``: ``(r,)`` weights of its components and ``dense_weight`` that of its dense
        extras, when the caller fixes them (``normalise=False``); else they come from the
        method's ``share`` and the update's example count. Raises ValueError naming the
        client for an update that does not fit the earlier ones (validation as
        :func:`rblora.aggregation.validation.validate_updates`)."""
        index = self.count
        if self._shapes is None:
            self._shapes, self._dense_shapes = first_shapes(update, index)
        validate_update(update, index, self._shapes, self._dense_shapes or {})
        if update.client_id is not None and update.client_id in self._ids:
            raise ValueError(f"{update.describe(index)}: client {update.client_id} sent twice")
        r_k = {update.rank(m) for m in update.factors}
        rank = max(r_k) if r_k else 0
        if rank and rank not in self._ranks:
            raise ValueError(
                f"{update.describe(index)}: rank {rank}, but the round's clients have ranks "
                f"{self._ranks}"
            )
        if update.client_id is not None:
            self._ids.add(update.client_id)
        self._promote(update)
        width = self._ranks[-1]
        if self.normalise:
            raw, mass = self.method.share(rank or 1, int(update.num_examples), width)
            if rank:
                self._den += mass
            weights = raw[:rank]
            dense_weight = float(update.num_examples)
            self._dense_den += dense_weight
        elif weights is None or (update.dense and dense_weight is None):
            raise ValueError("RoundSum(normalise=False).add needs the client's weights")
        self._widest = max(self._widest, rank)
        for module in self._shapes:
            a, bh = update.scaled_factors(module, self._work)
            if "B" in self.protocol.local:  # the client's own: never summed (the server has none)
                bh = torch.zeros_like(bh)
            target = self._modules.get(module)
            if target is None:
                target = self._modules[module] = _ModuleSum(
                    self.method.form, self._shapes[module], self._bands(), self._dense_allowed(),
                    self.protocol.fixed, self._source(module), check_a=self._checks_a(),
                )  # fmt: skip
            who = f"{update.describe(index)}, module {module!r}"
            target.add(a, bh, weights.to(self._work), who)
            if self.method.residual:  # sum_k Bh_k diag(w_k) A_k beside the factors' sums
                stack = self._stacks.get(module)
                if stack is None:
                    stack = self._stacks[module] = _ModuleSum(
                        "stack", self._shapes[module], self._bands(), True
                    )
                stack.add(a, bh, weights.to(self._work), who)
        for name in sorted(self._dense_shapes or {}):
            value = update.dense[name].detach().to("cpu", self._work)
            total = self._extras.get(name)
            if total is None:
                total = self._extras[name] = torch.zeros(value.shape, dtype=self._work)
            total += float(dense_weight) * value
        self.count += 1

    # ------------------------------------------------------------------ the result
    def held(self, width: int | None = None) -> dict[str, ModuleDelta]:
        """The aggregated update of every module: ``(A_g, B_g)`` or a dense ``(d_out, d_in)``.
        ``width``: the padded form's width (default: the widest rank added when normalising,
        the population's widest otherwise)."""
        if width is None:
            width = self._widest if self.normalise else self._ranks[-1]
        out: dict[str, ModuleDelta] = {}
        den = self._den[:width] if self.normalise else None
        for module in sorted(self._shapes or {}):
            target = self._modules.get(module)
            if target is None:  # nobody took part (under DP): zeros, to which noise is added
                d_out, d_in = self._shapes[module]
                if self.method.form == "stack":
                    out[module] = torch.zeros(d_out, d_in, dtype=self._work)
                else:
                    source = self._source(module)
                    a = torch.zeros(width, d_in, dtype=self._work)
                    b = torch.zeros(d_out, width, dtype=self._work)
                    if source is not None and "A" in self.protocol.fixed:
                        a = source("A", width).to(self._work)
                    if source is not None and "B" in self.protocol.fixed:
                        b = source("B", width).to(self._work)
                    out[module] = (a, b)
                continue
            out[module] = target.result(width, den)
        return out

    def stack_sums(self, width: int | None = None) -> dict[str, ModuleDelta]:
        """A residual method's weighted sum of the clients' updates per module,
        ``sum_k Bh_k diag(gamma_k) A_k`` (divided by the denominators when normalising), as a
        stack ``(A_s, B_s)`` or dense; zeros where nobody took part. ``width``: as :meth:`held`."""
        if width is None:
            width = self._widest if self.normalise else self._ranks[-1]
        den = self._den[:width] if self.normalise else None
        out: dict[str, ModuleDelta] = {}
        for module in sorted(self._shapes or {}):
            stack = self._stacks.get(module)
            if stack is None:
                out[module] = torch.zeros(self._shapes[module], dtype=self._work)
            else:
                out[module] = stack.result(width, den)
        return out

    def dense_extras(self) -> dict[str, Tensor]:
        """Each dense extra's weighted sum (divided by the examples when normalising)."""
        shapes = self._dense_shapes or {}
        out = {}
        for name in sorted(shapes):
            total = self._extras.get(name)
            if total is None:
                total = torch.zeros(shapes[name], dtype=self._work)
            elif self.normalise:
                total = (total.double() / self._dense_den).to(self._work)
            out[name] = total
        return out

    def finish(self) -> GlobalUpdate:
        """The round's :class:`GlobalUpdate` (normalising: ValueError if nothing was added)."""
        if self.normalise and self.count == 0:
            raise ValueError("no client updates to aggregate (empty list); pass at least one")
        held = self.held()
        residual = None
        if self.method.residual:
            residual = {m: residual_of(t, *held[m]) for m, t in self.stack_sums().items()}
        return GlobalUpdate(
            self.method.name, self.reduction, held, self.out_dtype, self.dense_extras(),
            svd_energy=self.svd_energy, residual=residual,
        )  # fmt: skip

    @property
    def out_dtype(self) -> torch.dtype:
        """The promoted dtype of the factors added (float32 if none had factors)."""
        return self._dtype or torch.float32

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module -> ``(d_out, d_in)`` of the round (given, or the first update's)."""
        return dict(self._shapes or {})

    @property
    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Dense extra -> shape of the round (given, or the first update's)."""
        return dict(self._dense_shapes or {})

    # ------------------------------------------------------------------ internals
    def _promote(self, update: ClientUpdate) -> None:
        for a, b in update.factors.values():
            for t in (a, b):
                self._dtype = t.dtype if self._dtype is None else torch.promote_types(
                    self._dtype, t.dtype
                )  # fmt: skip
        if any(t.dtype == torch.float64 for t in update.dense.values()):
            self._dtype = torch.float64 if self._dtype is None else self._dtype
        work = torch.float64 if self._dtype == torch.float64 else torch.float32
        if work != self._work:
            self._work = work
            for target in [*self._modules.values(), *self._stacks.values()]:
                target.to(work)
            self._extras = {n: t.to(work) for n, t in self._extras.items()}

    def _source(self, module: str):
        """``source(name, count)``: the module's fixed factor ``name`` (``A: (count, d_in)``,
        ``B: (d_out, count)``) from :attr:`held_source` when this round fixes a factor and its
        source is known; None otherwise."""
        if not self.protocol.fixed or self.held_source is None:
            return None
        d_out, d_in = self._shapes[module]
        held = self.held_source
        return lambda name, count: held.factor(name, module, count, d_in if name == "A" else d_out)

    def _checks_a(self) -> bool:
        """A client's frozen A must be the shared one (bitwise); a held factor is not read."""
        return "A" in self.protocol.frozen

    def _bands(self) -> list[int]:
        """Band starts: the components ``j`` where some client's mass may change (0 and each
        rank where the method's mass is not flat; only 0 when nothing is divided)."""
        if not self.normalise:
            return [0]
        widest = self._ranks[-1]
        starts = {0}
        for r in self._ranks:
            _, mass = self.method.share(r, 1, widest)
            changes = torch.nonzero(mass[1:] != mass[:-1]).flatten() + 1
            starts.update(int(j) for j in changes)
        return sorted(starts)

    def _dense_allowed(self) -> bool:
        """A stack may become dense sums unless its order matters (FLoRA's truncate)."""
        return not (self.method.form == "stack" and self.reduction == "truncate")


def residual_of(total: ModuleDelta, a_g: Tensor, b_g: Tensor) -> ModuleDelta:
    """``total - b_g @ a_g`` (``total``: a stack ``(A_s, B_s)`` or a dense ``(d_out, d_in)``;
    ``a_g: (R, d_in)``, ``b_g: (d_out, R)``): the residual a FedEx-style method folds into the
    base. Exact as the stack ``([A_s; a_g], [B_s, -b_g])`` while no wider than the matrix,
    dense beyond. New tensors."""
    if isinstance(total, Tensor):
        return total - b_g.to(total) @ a_g.to(total)
    a_s, b_s = total
    if a_s.shape[0] + a_g.shape[0] > min(b_s.shape[0], a_s.shape[1]):
        return b_s @ a_s - b_g.to(b_s) @ a_g.to(a_s)
    return torch.cat([a_s, a_g.to(a_s)]), torch.cat([b_s, -b_g.to(b_s)], dim=1)


class _ModuleSum:
    """One module's running sum: padded numerators, a weighted stack, or dense band sums."""

    def __init__(
        self, form: str, shape: tuple[int, int], bands, dense_allowed: bool, fixed=(),
        source=None, check_a: bool = True,
    ):  # fmt: skip
        self.form = form
        self.fixed = tuple(fixed) if form == "padded" else ()  # factors held, never summed
        self.source = source  # source(name, count): the round's fixed factors, or None
        self.check_a = check_a  # a client's fixed A must be the source's prefix (frozen A)
        self.d_out, self.d_in = shape
        self.bands = bands  # component index where each band starts
        self.dense_allowed = dense_allowed
        self.a_rows: list[Tensor] = []  # stack: weighted rows of A
        self.b_cols: list[Tensor] = []  # stack: columns of Bh
        self.comps: list[Tensor] = []  # stack: each row's component index j
        self.width = 0
        self.dense: list[Tensor] | None = None  # one (d_out, d_in) per band, once wider
        self.pad_a: Tensor | None = None
        self.pad_b: Tensor | None = None
        self.held_a: Tensor | None = None  # a fixed A held from the clients (no source)
        self.held_bt: Tensor | None = None  # a fixed B (transposed, Bh^T) held from the clients
        self._cache: dict[str, Tensor] = {}  # fixed factor -> widest drawn from the source

    def to(self, dtype: torch.dtype) -> None:
        self.a_rows = [t.to(dtype) for t in self.a_rows]
        self.b_cols = [t.to(dtype) for t in self.b_cols]
        if self.dense is not None:
            self.dense = [t.to(dtype) for t in self.dense]
        if self.pad_a is not None:
            self.pad_a, self.pad_b = self.pad_a.to(dtype), self.pad_b.to(dtype)
        if self.held_a is not None:
            self.held_a = self.held_a.to(dtype)
        if self.held_bt is not None:
            self.held_bt = self.held_bt.to(dtype)

    def add(self, a: Tensor, bh: Tensor, w: Tensor, who: str = "") -> None:
        r = a.shape[0]
        if self.form == "padded":
            self._grow_padded(r, a.dtype)
            if "A" not in self.fixed:
                self.pad_a[:r] += w[:, None] * a
            elif self.source is not None:  # the source's A; a frozen one must be the client's
                if self.check_a:
                    held_rows([a], r, self._fixed("A", r).to(a.dtype), [who])
            else:  # no source known: hold the widest client's
                self.held_a = self._hold(self.held_a, a, who)
            if "B" not in self.fixed:
                self.pad_b[:, :r] += bh * w[None, :]
            elif self.source is None:  # scale-folded Bh_k = s_k B_k: equal up to rounding
                self.held_bt = self._hold(self.held_bt, bh.T, who, 1e-5, "held B")
            return
        weighted = w[:, None] * a
        if self.dense is not None:
            self._add_dense(weighted, bh, torch.arange(r))
            return
        self.a_rows.append(weighted)
        self.b_cols.append(bh)
        self.comps.append(torch.arange(r))
        self.width += r
        if self.dense_allowed and self.width > min(self.d_out, self.d_in):
            a_s, b_s, comps = self._stack()
            self.a_rows, self.b_cols, self.comps = [], [], []
            self.dense = [a_s.new_zeros(self.d_out, self.d_in) for _ in self.bands]
            self._add_dense(a_s, b_s, comps)

    @staticmethod
    def _hold(
        held: Tensor | None, rows: Tensor, who: str, rtol: float = 0.0, what: str = "frozen A"
    ) -> Tensor:
        """The widest of ``held`` and a client's ``rows`` (a fixed factor, components as
        rows), each the other's prefix (:func:`.linalg.held_rows`)."""
        width = max(rows.shape[0], 0 if held is None else len(held))
        return held_rows([rows], width, held, [who], rtol=rtol, what=what)

    def _fixed(self, name: str, count: int) -> Tensor:
        """The first ``count`` components of the source's fixed factor ``name`` (drawn once,
        as wide as asked)."""
        have = self._cache.get(name)
        size = None if have is None else (have.shape[0] if name == "A" else have.shape[1])
        if size is None or size < count:
            have = self._cache[name] = self.source(name, count)
        return have[:count] if name == "A" else have[:, :count]

    def _band_of(self, comps: Tensor) -> Tensor:
        return torch.bucketize(comps, torch.tensor(self.bands), right=True) - 1

    def _add_dense(self, a_rows: Tensor, b_cols: Tensor, comps: Tensor) -> None:
        band = self._band_of(comps)
        for b in torch.unique(band).tolist():
            pick = band == b
            # in place: no (d_out, d_in) temporary
            self.dense[b].addmm_(b_cols[:, pick], a_rows[pick])

    def _stack(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.cat(self.a_rows), torch.cat(self.b_cols, dim=1), torch.cat(self.comps)

    def _grow_padded(self, r: int, dtype: torch.dtype) -> None:
        have = 0 if self.pad_a is None else self.pad_a.shape[0]
        if have >= r:
            return
        a = torch.zeros(r, self.d_in, dtype=dtype)
        b = torch.zeros(self.d_out, r, dtype=dtype)
        if self.pad_a is not None:
            a[:have], b[:, :have] = self.pad_a, self.pad_b
        self.pad_a, self.pad_b = a, b

    def result(self, width: int, den: Tensor | None) -> ModuleDelta:
        """The module's aggregated update: numerators divided by ``den`` (if given)."""
        if self.form == "padded":
            self._grow_padded(width, self.pad_a.dtype)
            a, b = self.pad_a[:width].clone(), self.pad_b[:, :width].clone()
            if den is not None:
                inv = torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
                a *= inv.to(a)[:, None]
                b *= inv.to(b)[None, :]
            if "A" in self.fixed and self.source is not None:
                a = self._fixed("A", width).to(a.dtype)
            elif self.held_a is not None:
                a = held_rows([], width, self.held_a)
            if "B" in self.fixed and self.source is not None:
                b = self._fixed("B", width).to(b.dtype)
            elif self.held_bt is not None:
                b = held_rows([], width, self.held_bt).T.contiguous()
            return a, b
        if self.dense is None:
            a_s, b_s, comps = self._stack()
            if den is not None:
                a_s = a_s / den[comps].to(a_s)[:, None]
            return a_s, b_s.clone()
        total = self.dense[0].new_zeros(self.d_out, self.d_in)
        for b, start in enumerate(self.bands):
            if den is None:
                total += self.dense[b]
                continue
            end = self.bands[b + 1] if b + 1 < len(self.bands) else den.shape[0]
            values = den[start:end]
            if values.numel() == 0 or not bool((values > 0).any()):
                continue
            if not bool((values == values[0]).all()):
                raise ValueError(
                    f"the method's denominators differ inside components {start}..{end - 1}; "
                    "its share must change only where a client's rank ends"
                )
            total += self.dense[b] / float(values[0])
        return total
