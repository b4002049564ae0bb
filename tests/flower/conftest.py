"""A tiny language-model workspace shared by the end-to-end tests of this folder."""

import pytest
from run_helpers import lm_workspace, local_test_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return lm_workspace(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def local_ws(workspace, tmp_path_factory):
    """The workspace's model with data whose clients each hold out a quarter of their records."""
    return local_test_workspace(workspace, tmp_path_factory.mktemp("local"))
