"""Which rounds write their folders (``--save_every``) and how many stay (``--keep_last``).

A round folder ``round_<t>/`` holds the global model after round t and, with
``--save_client_adapters``, every selected client's adapter. For a Llama-3.1-8B run with the
seed's ranks one round folder is 3.2 GB (RB-LoRA) to 6.6 GB (FLoRA from round 3): 50 rounds would
fill 160-320 GB. So:

- ``--save_every N`` writes the folders of rounds N, 2N, ... and always of the last round;
  ``0`` (the default) picks N: every round when the folders the run keeps stay within
  :data:`BUDGET_BYTES` (20 GB) at the most a round folder can take (:func:`round_folder_bytes`),
  else the smallest N that keeps them within it (:func:`auto_every`). Tiny and embedded models
  (SmolLM2-135M: at most 0.31 GB a round) save every round; Llama-3.1-8B with the seed's ranks
  over 50 rounds saves every 9th round (RB-LoRA) or every 17th (FLoRA).
- ``--keep_last N`` keeps the newest N round folders of completed rounds, deleting older ones
  after each round's checkpoint (``0``, the default: all). The last round is the newest, so it
  is always kept.

Both are resumable: a resumed run may change them; folders already written stay until a
``--keep_last`` deletes them. Deleting is crash-safe (:meth:`RunFolder.drop_round`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rblora.federation.rundir import RunFolder
from rblora.protocol.types import UpdateLayout

if TYPE_CHECKING:
    from rblora.federation.options import TrainArgs

BUDGET_BYTES = 20 * 10**9
"""What the round folders a run keeps may take at most, by the bound, when ``--save_every 0``."""
BYTES_PER_VALUE = 4  # float32, as every folder is written


@dataclass(frozen=True)
class SavePlan:
    """The resolved schedule of one run (or of one resumed part of it)."""

    every: int
    """Write round t's folder when ``t % every == 0`` or t is the last round."""
    keep_last: int
    """Keep the newest this many round folders (0: all)."""
    last_round: int
    """The run's last round (``--num_communication_rounds``): always written."""

    def saves(self, round_: int) -> bool:
        """True if round ``round_`` writes its folder."""
        return round_ % self.every == 0 or round_ >= self.last_round

    def begin_round(self, folder: RunFolder, round_: int) -> None:
        """Before round ``round_`` writes anything: clear leftovers of an interrupted deletion,
        and a folder of this round from an interrupted attempt if this round writes none."""
        folder.clean_dropped()
        if not self.saves(round_):
            folder.drop_round(round_)

    def end_round(self, folder: RunFolder, round_: int) -> list[int]:
        """After round ``round_``'s checkpoint: delete the round folders beyond ``keep_last``.
        Returns the rounds whose folders were deleted."""
        if not self.keep_last:
            return []
        return folder.prune_rounds(self.keep_last, upto=round_)

    def describe(self, folder_bytes: int | None = None) -> str:
        """One line for the log: what is written and kept."""
        when = "every round" if self.every == 1 else f"every {self.every} rounds and the last"
        size = f" (each at most {decimal_size(folder_bytes)})" if folder_bytes is not None else ""
        keep = f"the newest {self.keep_last} kept" if self.keep_last else "all kept"
        return f"round folders: {when}{size}, {keep}"


def decimal_size(n: int) -> str:
    """``n`` bytes in decimal units (the docs' GB are 10^9 bytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def plan_for(args: TrainArgs, layout: UpdateLayout) -> tuple[SavePlan, int]:
    """The schedule of a run with options ``args`` whose clients' updates look like ``layout``,
    and the bound of one round folder's bytes it was based on."""
    from rblora.aggregation import get_method

    # a DP-noised stacked update is dense every round, as a merged running total is
    noised_dense = args.private and get_method(args.method).form == "stack"
    bound = round_folder_bytes(
        layout,
        args.ranks(),
        merge=args.reduction() == "merge" or noised_dense,
        clients=args.saves_client_adapters(),
    )
    rounds = args.num_communication_rounds
    every = args.save_every or auto_every(rounds, bound, args.keep_last)
    return SavePlan(every=every, keep_last=args.keep_last, last_round=rounds), bound


def round_folder_bytes(
    layout: UpdateLayout, ranks: list[int], *, merge: bool, clients: bool
) -> int:
    """The most one round folder can take, float32.

    Global model: each module ``(d_out, d_in)`` at rank ``min(d_out, d_in)`` under the merge
    protocol (its running total goes dense), else at most the sum of all clients' ranks (a stacked
    global update; HETLoRA's is narrower), never above ``min(d_out, d_in)`` (wider is stored as
    ``(I, dW)``); plus the dense extras. Client adapters: every client at its own rank, with its
    dense extras.
    """
    dense = sum(math.prod(shape) for shape in layout.dense.values())
    stack = sum(ranks)
    values = dense
    for d_out, d_in in layout.modules.values():
        width = min(d_out, d_in) if merge else min(d_out, d_in, stack)
        values += width * (d_out + d_in)
    if clients:
        per_rank = sum(d_out + d_in for d_out, d_in in layout.modules.values())
        values += stack * per_rank + dense * len(ranks)
    return values * BYTES_PER_VALUE


def auto_every(
    num_rounds: int, folder_bytes: int, keep_last: int, budget: int = BUDGET_BYTES
) -> int:
    """The smallest N whose schedule (rounds N, 2N, ... and the last) keeps at most ``budget``
    bytes of round folders at ``folder_bytes`` each (``keep_last`` of them at most, if set);
    ``num_rounds`` (the last round only) if none does."""
    for every in range(1, num_rounds + 1):
        written = num_rounds // every + (1 if num_rounds % every else 0)
        kept = min(written, keep_last) if keep_last else written
        if kept * folder_bytes <= budget:
            return every
    return max(num_rounds, 1)
