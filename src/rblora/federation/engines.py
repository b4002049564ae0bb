"""Engines: what runs the rounds of a run, picked by ``--engine``, joined by declaration.

An engine is a function ``run(args: TrainArgs, given: set[str]) -> dict`` (the run's results,
as :func:`rblora.federation.setup.finish_run` returns them) that prepares the run, drives the
round core of :mod:`rblora.federation.rounds` and finishes it. An engine joins by declaring an
entry point in the group ``rblora.engines`` of its distribution's metadata; rblora's own
``pyproject.toml`` declares::

    [project.entry-points."rblora.engines"]
    inprocess = "rblora.federation.loop:run_inprocess"
    flower = "rblora.flower.simulation:run_simulation_engine"

so the command line knows every engine without importing any (the round core imports no engine).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUP = "rblora.engines"

Engine = Callable[..., dict[str, Any]]


def _declared() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available_engines() -> list[str]:
    """Names of the declared engines, sorted (``inprocess`` first)."""
    return sorted(_declared(), key=lambda name: (name != "inprocess", name))


def get_engine(name: str) -> Engine:
    """The engine ``name``; ValueError naming the valid ones, or what a declared engine lacks."""
    declared = _declared()
    if name not in declared:
        valid = ", ".join(available_engines()) or "none (rblora is not installed: pip install -e .)"
        raise ValueError(f"engine {name!r}: valid are {valid}")
    try:
        return declared[name].load()
    except ImportError as err:
        raise ValueError(
            f"engine {name!r} cannot be loaded ({err}); install what it needs, for flower: "
            "pip install -e '.[flower]'"
        ) from None
