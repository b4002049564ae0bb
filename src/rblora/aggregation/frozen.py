"""The shared random initialisation of a frozen factor (a :class:`~.types.ClientProtocol` role).

Under a frozen-A protocol (FFA-LoRA) every client's ``A: (r, d_in)`` is the first ``r`` rows of
one matrix per module, drawn from the run's seed and never trained or sent: the server and each
client draw it for themselves and get the same bits. Row ``j`` of module ``m`` is drawn from its
own generator, seeded by a hash of ``(seed, m, j)``, so a client of rank r draws r rows and gets
exactly the first r rows of a wider client's matrix, whatever the widest rank of the run.

The distribution is the one a fresh LoRA's A starts from (PEFT's kaiming-uniform with
``a = sqrt(5)``): ``U(-1/sqrt(d_in), 1/sqrt(d_in))``, float32.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def _row_seed(seed: int, module: str, row: int) -> int:
    text = f"rblora frozen factor/{int(seed)}/{module}/{int(row)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class FrozenInit:
    """The frozen factors of one run: ``seed`` is the run's (public) seed."""

    seed: int

    def rows(self, module: str, count: int, d_in: int) -> Tensor:
        """``(count, d_in)`` float32: the first ``count`` rows of ``module``'s frozen A."""
        bound = 1.0 / math.sqrt(d_in)
        out = torch.empty(count, d_in, dtype=torch.float32)
        gen = torch.Generator()
        for j in range(count):
            gen.manual_seed(_row_seed(self.seed, module, j))
            out[j] = torch.rand(d_in, generator=gen, dtype=torch.float32) * (2 * bound) - bound
        return out

    def factor(self, name: str, module: str, count: int, size: int) -> Tensor:
        """A held factor's source before any global factor exists (as
        :meth:`.starts.StartBasis.factor`): A's first ``count`` rows (``size = d_in``); a frozen
        or not yet aggregated B has no initialisation but zero, so B is refused."""
        if name != "A":
            raise ValueError(f"the run's frozen initialisation has no {name} (only A is drawn)")
        return self.rows(module, count, size)

    def factors(self, shapes: Mapping[str, tuple[int, int]], rank: int) -> dict[str, Tensor]:
        """Module -> its frozen ``A: (rank, d_in)`` for every module of ``shapes``
        (module -> ``(d_out, d_in)``)."""
        return {m: self.rows(m, int(rank), int(d_in)) for m, (_, d_in) in sorted(shapes.items())}
