"""Imports point one way: aggregation -> protocol -> tasks -> federation (round core, in-process
engine) -> engines (flower) -> experiments. Read from the source (imports inside functions
included, ``if TYPE_CHECKING:`` blocks excluded), so a cycle cannot come back unnoticed."""

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


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m.split(".")[1] for m in found if m.startswith("rblora.") and m.count(".") >= 1}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    wrong = {
        str(path.relative_to(SRC)): sorted(_runtime_imports(path) & FORBIDDEN[package])
        for path in sorted((SRC / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_every_declared_engine_loads():
    from rblora.federation.engines import available_engines, get_engine

    assert available_engines()[:1] == ["inprocess"] and "flower" in available_engines()
    assert all(callable(get_engine(name)) for name in available_engines())
    with pytest.raises(ValueError, match=r"engine 'ray': valid are inprocess, flower"):
        get_engine("ray")
