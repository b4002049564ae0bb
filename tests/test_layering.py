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

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rblora"

# package -> rblora packages it must not import
FORBIDDEN = {
    "aggregation": {"protocol", "tasks", "federation", "flower", "experiments", "adapters"},
    "protocol": {"tasks", "federation", "flower", "experiments"},
    "tasks": {"federation", "flower", "experiments"},
    "federation": {"flower", "experiments"},
    "flower": {"experiments"},
}


def module_name(path: Path) -> str:
    """``src/rblora/aggregation/types.py`` -> ``rblora.aggregation.types`` (a package's
    ``__init__.py`` -> the package's name)."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """The modules of ``src/rblora`` that ``path`` imports (see the module doc for the rules)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    own = module_name(path)
    package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {name for name in found if name in MODULES and name != own}


GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds a cycle), by
    Tarjan's algorithm; iterative, so a deep graph cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


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
