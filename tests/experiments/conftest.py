"""A tiny language-model workspace shared by the end-to-end tests of this folder."""

import pytest
from run_helpers import lm_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return lm_workspace(tmp_path_factory.mktemp("train"))
