"""Shared fixtures: tiny models and a tokenizer built from configs, no downloads."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return build_tiny_llama(vocab_size=len(tiny_tokenizer))
