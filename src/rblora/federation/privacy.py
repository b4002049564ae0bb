"""The run's client-level differential privacy settings and their accounting (Opacus).

``--dp_clip C`` with ``--dp_noise_multiplier z`` (or ``--dp_epsilon E``, solved for ``z`` over
the run's rounds) turns on :func:`rblora.aggregation.privacy.private_aggregate` for every round.
Accounting treats each round as one step of the sampled Gaussian mechanism with sampling rate
``q`` = the fraction of the clients selected per round, using Opacus's accountants
(``opacus.accountants.RDPAccountant`` by default, ``PRVAccountant`` with ``--dp_accountant prv``)
at ``--dp_delta``. Opacus is an optional dependency (``pip install 'rblora[dp]'``), imported only
when DP is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants ``--dp_accountant`` accepts."""


@dataclass(frozen=True)
class PrivacySettings:
    """Client-level DP of a run, resolved from its options."""

    clip: float
    """``C``: largest Frobenius norm of one client's whole term."""
    noise_multiplier: float
    """``z``: noise std ``z * C``; given, or solved from :attr:`target_epsilon`."""
    sample_rate: float
    """``q``: clients selected per round / configured clients."""
    delta: float
    """``delta`` of the (epsilon, delta) guarantee."""
    accountant: str
    """``rdp`` or ``prv``."""
    target_epsilon: float | None = None
    """The budget ``z`` was solved for (None when ``z`` was given)."""

    def epsilon(self, rounds: int) -> float | None:
        """Epsilon at :attr:`delta` after ``rounds`` rounds (None without noise: no guarantee)."""
        return epsilon_after(self.accountant, self.noise_multiplier, self.sample_rate, rounds,
                             self.delta)  # fmt: skip

    def describe(self) -> str:
        solved = f" (solved for epsilon {self.target_epsilon:g})" if self.target_epsilon else ""
        return (
            f"client-level DP: clip {self.clip:g}, noise multiplier {self.noise_multiplier:.4g}"
            f"{solved}, sampling rate {self.sample_rate:.4g}, delta {self.delta:g}, "
            f"{self.accountant} accountant"
        )


def _opacus_accountants():
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        raise ValueError(
            "differential privacy (--dp_clip) needs opacus for its accountant: "
            "pip install 'rblora[dp]' (or make setup)"
        ) from None
    return {"rdp": RDPAccountant, "prv": PRVAccountant}, get_noise_multiplier


def epsilon_after(
    accountant: str, noise_multiplier: float, sample_rate: float, rounds: int, delta: float
) -> float | None:
    """Epsilon of ``rounds`` steps of the sampled Gaussian mechanism ``(q, z)`` at ``delta``,
    from Opacus's accountant (recomputed from scratch, so it needs no state of its own)."""
    if rounds < 1:
        return 0.0
    if noise_multiplier == 0:
        return None
    classes, _ = _opacus_accountants()
    acc = classes[accountant]()
    for _ in range(rounds):
        acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def _quiet():
    """Silence the accountants' warnings inside the block: RDP's "optimal order is the largest
    alpha" (its bound is then looser than it could be, i.e. conservative) and numpy's
    divide-by-zero inside the PRV accountant at sampling rate 1 (a branch ``np.where`` drops)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        yield


def check_options(
    *,
    clip: float | None,
    noise_multiplier: float | None,
    epsilon: float | None,
    delta: float,
    accountant: str,
) -> None:
    """Check the DP options' values (no accountant needed); ValueError (one line naming the bad
    value) for: a non-positive clip; a negative or non-finite noise multiplier; both or neither
    of noise multiplier and epsilon; epsilon <= 0; delta outside (0, 1); an unknown
    accountant; noise or epsilon without a clip."""
    if clip is None:
        if noise_multiplier is not None or epsilon is not None:
            raise ValueError(
                "--dp_noise_multiplier / --dp_epsilon need --dp_clip C (the largest norm of one "
                "client's contribution)"
            )
        return
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"dp_clip {clip} must be a finite number > 0")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp_accountant {accountant!r}: valid are {', '.join(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ValueError(f"dp_delta {delta} must be in (0, 1), e.g. 1e-5")
    if (noise_multiplier is None) == (epsilon is None):
        raise ValueError(
            "with --dp_clip give exactly one of --dp_noise_multiplier z and --dp_epsilon E "
            f"(got {noise_multiplier} and {epsilon})"
        )
    if noise_multiplier is not None and not (
        noise_multiplier >= 0 and math.isfinite(noise_multiplier)
    ):
        raise ValueError(f"dp_noise_multiplier {noise_multiplier} must be a number >= 0")
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"dp_epsilon {epsilon} must be a finite number > 0")


def privacy_settings(
    *,
    clip: float | None,
    noise_multiplier: float | None,
    epsilon: float | None,
    delta: float,
    accountant: str,
    sample_rate: float,
    rounds: int,
) -> PrivacySettings | None:
    """The run's DP settings with ``z`` resolved; None when DP is off (no ``--dp_clip``).

    ValueError for the bad values :func:`check_options` names, when opacus is missing, and when
    ``epsilon`` cannot be met in ``rounds`` rounds at this sampling rate (Opacus's
    ``get_noise_multiplier`` finds no noise multiplier large enough)."""
    check_options(
        clip=clip, noise_multiplier=noise_multiplier, epsilon=epsilon, delta=delta,
        accountant=accountant,
    )  # fmt: skip
    if clip is None:
        return None
    if noise_multiplier is not None:
        _opacus_accountants()  # the accountant is needed every round: fail now if missing
        return PrivacySettings(clip, noise_multiplier, sample_rate, delta, accountant)
    z = solve_noise_multiplier(epsilon, delta, sample_rate, rounds, accountant)
    return PrivacySettings(clip, z, sample_rate, delta, accountant, target_epsilon=epsilon)


@functools.lru_cache(maxsize=16)  # a pure function of its arguments; a solve takes seconds
def solve_noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str
) -> float:
    """The noise multiplier Opacus's ``get_noise_multiplier`` finds for ``epsilon`` at ``delta``
    after ``rounds`` steps at ``sample_rate`` (epsilon within its tolerance 0.01 below the
    target); ValueError when no noise multiplier meets the budget."""
    _, solve = _opacus_accountants()
    try:
        with _quiet():
            z = solve(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant=accountant,
            )
    except ValueError:
        raise ValueError(
            f"dp_epsilon {epsilon:g} at delta {delta:g} cannot be met in {rounds} rounds at "
            f"sampling rate {sample_rate:.4g} with the {accountant} accountant (no noise "
            "multiplier is large enough); ask for a larger epsilon or delta, or fewer rounds"
        ) from None
    return float(z)
