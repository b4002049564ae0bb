"""MkDocs hook: the parts of pages that are written from the code at every build.

- ``options.md``, marker ``<!-- train.py options -->``: one table per option group of
  :func:`rblora.federation.options.build_parser`, the parser ``train.py --help`` prints, so the
  reference cannot drift from the command line;
- ``architecture.md``, marker ``<!-- package graph -->``: the packages and which ones they
  import, as a mermaid diagram, from the import graph ``tests/test_layering.py`` checks
  (``tests/import_graph.py``).

A page that lost its marker, or an ``rblora`` imported from another tree than this checkout,
fails the build.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
_DEFAULT = re.compile(r"\s*\(default: ([^()]*)\)$")


def on_page_markdown(markdown: str, page, config, files) -> str:
    for name, marker, render in GENERATED:
        if page.file.src_uri != name:
            continue
        if marker not in markdown:
            raise PluginError(f"docs/{name} lost its marker {marker!r}: nowhere to put it")
        markdown = markdown.replace(marker, render())
    return markdown


# ---------------------------------------------------------------------- train.py options
def options_markdown() -> str:
    """One Markdown table per option group of train.py's parser: option, default, meaning."""
    import rblora
    from rblora.federation.options import build_parser

    if not Path(rblora.__file__).resolve().is_relative_to(ROOT / "src"):
        raise PluginError(
            f"rblora is imported from {Path(rblora.__file__).parent}, not from this checkout's "
            f"src/: run `make setup` here (or set PYTHONPATH={ROOT / 'src'})"
        )
    parser = build_parser("train.py")
    negated = {
        a.dest: a.option_strings[0]
        for a in parser._actions
        if a.help == argparse.SUPPRESS and a.option_strings
    }
    parts = []
    for group in parser._action_groups:
        shown = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not shown or group.title == "positional arguments":
            continue
        title = "general" if group.title == "options" else group.title
        parts += [f"### {title[0].upper() + title[1:]}", "", "| option | default | meaning |"]
        parts.append("|---|---|---|")
        parts += [_option_row(action, negated.get(action.dest)) for action in shown]
        parts.append("")
    return "\n".join(parts)


def _option_row(action: argparse.Action, negation: str | None) -> str:
    flags = ", ".join(action.option_strings)
    if action.nargs == "?":  # a boolean: --flag, --flag true|false, --no_flag
        invocation = f"`{flags} [true|false]`" + (f", `{negation}`" if negation else "")
    elif action.nargs == 0:
        invocation = f"`{flags}`"
    elif action.nargs == "+":
        invocation = f"`{flags} A B ...` or `{flags} A,B`"
    else:
        invocation = f"`{flags} {action.dest.upper()}`"
    help_ = action.help or ""
    match = _DEFAULT.search(help_)
    default = "" if match is None else f"`{match.group(1)}`"
    meaning = help_ if match is None else help_[: match.start()]
    return f"| {invocation} | {default} | {_cell(meaning)} |"


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: HTML characters escaped, pipes kept as text."""
    text = html.escape(" ".join(text.split()), quote=False)
    return text.replace("|", "&#124;")


# ---------------------------------------------------------------------- package graph
def package_graph_markdown() -> str:
    """The packages of ``src/rblora`` and their imports as a mermaid flowchart; an import that
    a longer path already implies is left out (transitive reduction), and so is ``utils``, which
    almost every package imports."""
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tests/import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    graph = {
        p: {q for q in targets if q not in ("utils", "rblora")}
        for p, targets in module.package_graph().items()
        if p not in ("utils", "rblora")
    }
    lines = ["```mermaid", "flowchart LR"]
    for package in sorted(graph):
        for target in sorted(graph[package]):
            if not any(target in _reachable(graph, via) for via in graph[package] - {target}):
                lines.append(f"    {package} --> {target}")
    lines += [f"    {p}" for p in sorted(graph) if not graph[p] and not _imported(graph, p)]
    return "\n".join([*lines, "```"])


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _imported(graph: dict[str, set[str]], package: str) -> bool:
    return any(package in targets for targets in graph.values())


GENERATED = [
    ("options.md", "<!-- train.py options -->", options_markdown),
    ("architecture.md", "<!-- package graph -->", package_graph_markdown),
]


# ---------------------------------------------------------------------- API pages
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc):(<code>)~?\.?")


def on_page_content(html_: str, page, config, files) -> str:
    """The docstrings use Sphinx roles (``:class:`~.types.Method```), which Markdown leaves as
    text before a code span: drop the role and the ``~``/``.`` of relative names."""
    if not page.file.src_uri.startswith("api/"):
        return html_
    return _ROLE.sub(r"\1", html_)
