"""The import graph of ``src/rblora``, read from the source (nothing is imported).

Shared by ``tests/test_layering.py`` (the rules) and the site's architecture page
(``docs/hooks/options_reference.py`` draws the package graph from it). What counts as an edge
is stated in ``tests/test_layering.py``'s docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rblora"


def module_name(path: Path) -> str:
    """``src/rblora/aggregation/types.py`` -> ``rblora.aggregation.types`` (a package's
    ``__init__.py`` -> the package's name)."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """The modules of ``src/rblora`` that ``path`` imports (the rules: test_layering.py)."""
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


def package_of(module: str) -> str:
    """``rblora.aggregation.types`` -> ``aggregation``; top-level modules (``rblora.cli``) and
    the root package -> ``rblora``."""
    parts = module.split(".")
    if len(parts) == 1 or f"rblora.{parts[1]}" not in MODULES or not (SRC / parts[1]).is_dir():
        return "rblora"
    return parts[1]


def package_graph(graph: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Package -> the other packages its modules import."""
    graph = GRAPH if graph is None else graph
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        here = package_of(module)
        out.setdefault(here, set()).update(package_of(t) for t in targets)
        out[here].discard(here)
    return out
