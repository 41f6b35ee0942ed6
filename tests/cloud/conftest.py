"""Fixtures shared by the cloud's concurrency tests."""
from __future__ import annotations

import pytest

from eight_devices import FAMILY, NEW_TOKENS, load_eight_devices, reference_tokens


@pytest.fixture(scope="module")
def eight_devices(tiny_checkpoint, tmp_path_factory):
    """Eight device models (with a random draft adapter) and their prompts of 5 to 60 tokens."""
    return load_eight_devices(tiny_checkpoint(FAMILY), tmp_path_factory.mktemp("eight-devices"))


@pytest.fixture(scope="module")
def reference(eight_devices, tiny_checkpoint) -> list[list[int]]:
    """transformers' greedy tokens for each of the eight prompts."""
    return reference_tokens(tiny_checkpoint(FAMILY), eight_devices[1], NEW_TOKENS)
