"""The import graph of ``src/rblora``: packages point one way, and no module imports itself back.

1. Packages: aggregation -> protocol -> tasks -> federation (round core, in-process engine) ->
   engines (flower) -> experiments, never back (:data:`FORBIDDEN`).
2. Modules: no import cycle between any two modules of ``src/rblora`` (one cycle, however long,
   fails the test and is printed with its edges).

What counts as an edge from module ``m`` to module ``n`` (read from the source, nothing is
imported):

- ``import rblora.x.n`` and ``from rblora.x.n import name`` anywhere in ``m``: at module level
  **and inside functions**. A lazy import defers the cost of loading ``n``, not the dependency:
  ``m`` still needs ``n`` to work, so it counts.
- ``from rblora.x import n`` where ``n`` is a module is an edge to ``n``; where ``n`` is a name
  of the package's ``__init__`` it is an edge to ``rblora.x`` (the ``__init__``).
- Relative imports (``from .types import Method``) resolve to the module they name.
- Not edges: imports under ``if TYPE_CHECKING:`` (annotations only, never executed), and the
  parent packages Python runs implicitly when it loads a submodule (importing
  ``rblora.aggregation.types`` executes ``rblora/aggregation/__init__.py``; that is Python's
  loading order, not a dependency ``m`` chose).
"""

from __future__ import annotations

import pytest
from import_graph import GRAPH, MODULES, import_cycles, package_graph

# package -> rblora packages it must not import
FORBIDDEN = {
    "aggregation": {"protocol", "tasks", "federation", "flower", "experiments", "adapters"},
    "protocol": {"tasks", "federation", "flower", "experiments"},
    "tasks": {"federation", "flower", "experiments"},
    "federation": {"flower", "experiments"},
    "flower": {"experiments"},
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    wrong = {
        name: sorted({m.split(".")[1] for m in GRAPH[name]} & FORBIDDEN[package])
        for name in MODULES
        if name.split(".")[1:2] == [package]
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_no_import_cycle_between_modules():
    cycles = import_cycles(GRAPH)
    described = [
        "; ".join(f"{m} -> {', '.join(sorted(GRAPH[m] & set(c)))}" for m in c) for c in cycles
    ]
    assert not described, "import cycles:\n" + "\n".join(described)


def test_no_import_cycle_between_packages():
    packages = package_graph()
    assert not import_cycles(packages), packages


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_edges_follow_the_rules():
    # a lazy import inside a function counts; a relative import resolves; a name of a package's
    # __init__ is an edge to the package
    assert "rblora.federation.options" in GRAPH["rblora.federation.rundir"]
    assert "rblora.aggregation.types" in GRAPH["rblora.aggregation.rb_lora"]
    assert "rblora.aggregation" in GRAPH["rblora.federation.options"]


def test_every_declared_engine_loads():
    from rblora.federation.engines import available_engines, get_engine

    assert available_engines()[:1] == ["inprocess"] and "flower" in available_engines()
    assert all(callable(get_engine(name)) for name in available_engines())
    with pytest.raises(ValueError, match=r"engine 'ray': valid are inprocess, flower"):
        get_engine("ray")
