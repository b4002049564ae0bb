"""Fixtures for the data tests (helpers live in ``data_helpers.py``)."""

from __future__ import annotations

import pytest
from data_helpers import FAKE_INDEX, fake_images, fake_task


@pytest.fixture
def fake_assets(monkeypatch):
    """Replace the ``rblora.assets`` loaders with the small fakes of data_helpers."""
    import rblora.assets as assets

    monkeypatch.setattr(assets, "list_tasks", lambda: {k: dict(v) for k, v in FAKE_INDEX.items()})
    monkeypatch.setattr(assets, "load_task", fake_task)
    monkeypatch.setattr(assets, "load_images", fake_images)
    return assets
