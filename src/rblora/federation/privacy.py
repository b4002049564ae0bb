"""The run's client-level differential privacy settings and their accounting (Opacus).

``--dp_clip C`` with ``--dp_noise_multiplier z`` (or ``--dp_epsilon E``, solved for ``z`` over
the run's rounds) turns on :func:`rblora.aggregation.privacy.private_aggregate` for every round;
``--dp_clip_quantile Q`` makes the clip adaptive (Andrew et al. 2021; ``--dp_clip`` is then the
initial clip, 0.1 by default as in the paper).

**Accounting.** Each round is one step of the sampled Gaussian mechanism, composed by Opacus's
accountant (``opacus.accountants.RDPAccountant`` by default, ``PRVAccountant`` with
``--dp_accountant prv``) at ``--dp_delta``. Those accountants analyse **Poisson sampling** (each
client takes part independently with probability q, and who took part stays secret), so the
sampling rate given to them is:

- ``--client_sampling poisson``: ``q = --client_selection_frac``, the rate the run really uses
  (drawn from the secret noise key, recorded only in the server's private state);
- ``--client_sampling fixed`` (exactly ``round(qK)`` clients a round): ``q = 1``. A fixed-size
  selection is not Poisson sampling and gets no amplification here: the epsilon is that of a
  round in which every client takes part.

With adaptive clipping, ``z`` is the effective multiplier the accountant sees; the update gets
``z_u`` and the count ``sigma_b`` (:func:`rblora.aggregation.privacy.update_noise_multiplier`).

Opacus is an optional dependency (``pip install 'rblora[dp]'``), imported only when DP is asked
for.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

from rblora.aggregation.privacy import AdaptiveClip, update_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants ``--dp_accountant`` accepts."""
SAMPLINGS = ("fixed", "poisson")
"""Client sampling schemes ``--client_sampling`` accepts."""
INITIAL_CLIP = 0.1
"""The initial clip of adaptive clipping when ``--dp_clip`` is not given (Andrew et al.)."""
CLIP_LEARNING_RATE = 0.2
"""``eta_C`` of adaptive clipping's geometric update (Andrew et al.)."""
COUNT_STDDEV_PER_CLIENT = 1 / 20
"""The count's noise stddev per expected client a round (``sigma_b = m / 20``, Andrew et al.)."""


@dataclass(frozen=True)
class PrivacySettings:
    """Client-level DP of a run, resolved from its options."""

    clip: float
    """``C``: largest Frobenius norm of one client's whole term (the initial clip when
    :attr:`adaptive` is set)."""
    noise_multiplier: float
    """``z``: the multiplier the accountant sees; given, or solved from :attr:`target_epsilon`.
    The update's own noise is :attr:`update_noise_multiplier` (``z`` without adaptive
    clipping)."""
    sample_rate: float
    """``q``: the fraction of the clients a round is expected to hold (the weights' fixed
    denominator, whatever the sampling)."""
    sampling: str
    """``poisson`` or ``fixed`` (see the module doc)."""
    delta: float
    """``delta`` of the (epsilon, delta) guarantee."""
    accountant: str
    """``rdp`` or ``prv``."""
    target_epsilon: float | None = None
    """The budget ``z`` was solved for (None when ``z`` was given)."""
    adaptive: AdaptiveClip | None = None
    """Adaptive clipping (None: the clip stays :attr:`clip`)."""
    seeded_noise: bool = False
    """The noise key was derived from the public run seed (``--dp_noise_from_seed``): the noise
    can be re-drawn by anyone who knows the seed, so there is no guarantee."""

    @property
    def accounting_rate(self) -> float:
        """The sampling rate the accountant is given: ``q`` under Poisson sampling, 1 otherwise
        (module doc)."""
        return self.sample_rate if self.sampling == "poisson" else 1.0

    @property
    def update_noise_multiplier(self) -> float:
        """``z_u``: the update's noise std is ``z_u * C`` (``z`` itself without adaptive
        clipping)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.adaptive.count_stddev)

    @property
    def guarantee(self) -> bool:
        """True when the release is (epsilon, delta)-DP: noise > 0 from a secret key."""
        return self.noise_multiplier > 0 and not self.seeded_noise

    def epsilon(self, rounds: int) -> float | None:
        """Epsilon at :attr:`delta` after ``rounds`` rounds; None when there is no guarantee
        (no noise, or noise from the public seed)."""
        if not self.guarantee:
            return None if rounds >= 1 else 0.0
        return epsilon_after(self.accountant, self.noise_multiplier, self.accounting_rate,
                             rounds, self.delta)  # fmt: skip

    def record(self) -> dict:
        """The settings as ``config.json`` keeps them (public: no key, nothing of a client)."""
        adaptive = None
        if self.adaptive is not None:
            a = self.adaptive
            adaptive = {
                "quantile": a.quantile,
                "learning_rate": a.learning_rate,
                "count_stddev": a.count_stddev,
                "expected_clients": a.expected_clients,
            }
        return {
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "sample_rate": self.sample_rate,
            "accounting_sample_rate": self.accounting_rate,
            "adaptive_clip": adaptive,
            "guarantee": self.guarantee,
        }

    def describe(self) -> str:
        solved = f" (solved for epsilon {self.target_epsilon:g})" if self.target_epsilon else ""
        clip = f"clip {self.clip:g}"
        if self.adaptive is not None:
            a = self.adaptive
            clip = (
                f"adaptive clip from {self.clip:g} toward the {a.quantile:g}-quantile of the term "
                f"norms (learning rate {a.learning_rate:g}, count noise std {a.count_stddev:.4g}; "
                f"the update's noise multiplier {self.update_noise_multiplier:.4g})"
            )
        if self.sampling == "poisson":
            sampling = f"Poisson sampling at q = {self.sample_rate:.4g}, accounted at that q"
        else:
            sampling = (
                f"fixed-size selection ({self.sample_rate:.4g} of the clients a round), accounted "
                "at q = 1: the accountant's amplification assumes Poisson sampling "
                "(--client_sampling poisson)"
            )
        line = (
            f"client-level DP: {clip}, noise multiplier {self.noise_multiplier:.4g}{solved}, "
            f"{sampling}, delta {self.delta:g}, {self.accountant} accountant"
        )
        if self.seeded_noise:
            line += (
                "; NO GUARANTEE: --dp_noise_from_seed draws the noise from the public run seed "
                "(anyone who knows it can remove the noise); epsilon is recorded as null"
            )
        elif self.noise_multiplier == 0:
            line += "; no noise, so no guarantee (epsilon recorded as null)"
        return line


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
    clip_quantile: float | None = None,
    clip_learning_rate: float = CLIP_LEARNING_RATE,
    clip_count_stddev: float | None = None,
    sampling: str = "fixed",
    noise_from_seed: bool = False,
) -> None:
    """Check the DP options' values (no accountant needed); ValueError (one line naming the bad
    value) for: a non-positive clip; a negative or non-finite noise multiplier; both or neither
    of noise multiplier and epsilon; epsilon <= 0; delta outside (0, 1); an unknown accountant
    or sampling; a clip quantile outside (0, 1), a clip learning rate <= 0, a negative count
    stddev; noise, epsilon or adaptive-clipping options without DP."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"client_sampling {sampling!r}: valid are {', '.join(SAMPLINGS)}")
    if clip is None and clip_quantile is None:
        if noise_multiplier is not None or epsilon is not None or noise_from_seed:
            raise ValueError(
                "--dp_noise_multiplier / --dp_epsilon / --dp_noise_from_seed need --dp_clip C "
                "(the largest norm of one client's contribution) or --dp_clip_quantile Q"
            )
        if clip_count_stddev is not None:
            raise ValueError("--dp_clip_count_stddev needs --dp_clip_quantile (adaptive clipping)")
        return
    if clip is not None and not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"dp_clip {clip} must be a finite number > 0")
    if clip_quantile is not None and not 0 < clip_quantile < 1:
        raise ValueError(
            f"dp_clip_quantile {clip_quantile} must be in (0, 1): the fraction of clients whose "
            "term stays unclipped, e.g. 0.5 (the median)"
        )
    if not (clip_learning_rate > 0 and math.isfinite(clip_learning_rate)):
        raise ValueError(f"dp_clip_lr {clip_learning_rate} must be a finite number > 0")
    if clip_count_stddev is not None:
        if clip_quantile is None:
            raise ValueError("--dp_clip_count_stddev needs --dp_clip_quantile (adaptive clipping)")
        if not (clip_count_stddev >= 0 and math.isfinite(clip_count_stddev)):
            raise ValueError(f"dp_clip_count_stddev {clip_count_stddev} must be >= 0")
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
    if epsilon is not None and noise_from_seed:
        raise ValueError(
            "--dp_epsilon with --dp_noise_from_seed: noise drawn from the public seed gives no "
            "guarantee, so there is no epsilon to solve for; give --dp_noise_multiplier z"
        )


def privacy_settings(
    *,
    clip: float | None,
    noise_multiplier: float | None,
    epsilon: float | None,
    delta: float,
    accountant: str,
    sample_rate: float,
    rounds: int,
    sampling: str = "fixed",
    expected_clients: float | None = None,
    clip_quantile: float | None = None,
    clip_learning_rate: float = CLIP_LEARNING_RATE,
    clip_count_stddev: float | None = None,
    noise_from_seed: bool = False,
) -> PrivacySettings | None:
    """The run's DP settings with ``z`` resolved; None when DP is off (neither ``--dp_clip`` nor
    ``--dp_clip_quantile``).

    ``sample_rate``: the fraction of clients a round is expected to hold; ``expected_clients``:
    how many that is (adaptive clipping's fixed denominator; default: unknown, refused when
    adaptive clipping needs it). ValueError for the bad values :func:`check_options` names, when
    opacus is missing, when ``epsilon`` cannot be met in ``rounds`` rounds at the accounted
    sampling rate, and when adaptive clipping's count noise is too small for ``z``."""
    check_options(
        clip=clip, noise_multiplier=noise_multiplier, epsilon=epsilon, delta=delta,
        accountant=accountant, clip_quantile=clip_quantile, clip_learning_rate=clip_learning_rate,
        clip_count_stddev=clip_count_stddev, sampling=sampling, noise_from_seed=noise_from_seed,
    )  # fmt: skip
    if clip is None and clip_quantile is None:
        return None
    accounting = sample_rate if sampling == "poisson" else 1.0
    if noise_multiplier is not None:
        _opacus_accountants()  # the accountant is needed every round: fail now if missing
        z = noise_multiplier
    else:
        z = solve_noise_multiplier(epsilon, delta, accounting, rounds, accountant)
    adaptive = None
    if clip_quantile is not None:
        if expected_clients is None or not expected_clients > 0:
            raise ValueError("adaptive clipping needs the number of clients expected a round")
        stddev = clip_count_stddev
        if stddev is None:
            stddev = COUNT_STDDEV_PER_CLIENT * expected_clients if z > 0 else 0.0
        adaptive = AdaptiveClip(clip_quantile, clip_learning_rate, stddev, expected_clients)
        update_noise_multiplier(z, stddev)  # refuses a count noise too small for z, now
    return PrivacySettings(
        clip=INITIAL_CLIP if clip is None else clip,
        noise_multiplier=z,
        sample_rate=sample_rate,
        sampling=sampling,
        delta=delta,
        accountant=accountant,
        target_epsilon=epsilon,
        adaptive=adaptive,
        seeded_noise=noise_from_seed,
    )


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
