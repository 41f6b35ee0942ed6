"""Shared fixtures: tiny random checkpoints of every supported family, built once per session.

pytest inserts this folder (tests/ has no __init__.py, so it uses the "prepend" import mode) at the
front of sys.path before importing this conftest; the explicit insert below only makes that
independent of the import mode, so `from checkpoints import ...` works in every test file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from checkpoints import FAMILIES, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A function `(family, dtype=torch.float32, **overrides) -> Path` of a saved tiny checkpoint.

    Each distinct (family, dtype, overrides) is built once per session and shared; treat the folder
    as read-only (copy it into tmp_path before changing anything in it).
    """
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: torch.dtype = torch.float32, **overrides) -> Path:
        if family not in FAMILIES:
            raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        key = (family, dtype, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            name = f"{family}-{str(dtype).removeprefix('torch.')}-{len(cache)}"
            cache[key] = make_checkpoint(family, tmp_path_factory.mktemp(name), dtype=dtype, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family(request) -> str:
    """Every supported family, one at a time."""
    return request.param


@pytest.fixture(scope="session")
def checkpoint_dir(tiny_checkpoint, family) -> Path:
    """The float32 tiny checkpoint of `family`."""
    return tiny_checkpoint(family)
