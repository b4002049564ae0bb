"""The README stays short and points at pages that exist; the site's generated parts cover the
code. (``make docs`` builds the whole site with ``--strict``: broken links and anchors inside
the site, pages missing from the nav and unresolved API references fail it; CI runs it.)"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def test_the_readme_fits_on_a_few_screens():
    assert len(README.read_text().splitlines()) <= 250


def test_every_relative_link_of_the_readme_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local and {"docs/index.md", "docs/results.md", "docs/figures/lm_accuracy.png"} <= set(
        local
    )
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_the_pages_issue_24_names_exist():
    for name in ("privacy.md", "flower.md", "results.md", "tutorial-new-method.md", "options.md"):
        assert (DOCS / name).is_file(), name


def test_the_tutorial_shows_the_tested_file_itself():
    page = (DOCS / "tutorial-new-method.md").read_text()
    assert '--8<-- "examples/component_mean.py"' in page
    assert "def component_mean_weights" not in page  # included at build time, never copied


def _hook():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("generated", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_options_page_lists_every_option_of_train_py():
    from rblora.federation.options import TrainArgs

    text = _hook().options_markdown()
    missing = [f.name for f in fields(TrainArgs) if f"`--{f.name} " not in text]
    assert missing == []
    assert "| `--lora_alpha LORA_ALPHA` | `16.0` | LoRA alpha" in text
    assert "`--train_on_inputs [true|false]`, `--no_train_on_inputs`" in text
    assert (DOCS / "options.md").read_text().count("<!-- train.py options -->") == 1


def test_the_package_graph_is_drawn_from_the_layering_test():
    text = _hook().package_graph_markdown()
    assert text.startswith("```mermaid\nflowchart LR\n") and "flower --> federation" in text
    assert "utils" not in text
