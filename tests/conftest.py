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


def randomize_norms_and_biases(model_dir: Path, dtype: torch.dtype, seed: int = 1) -> None:
    """Give every bias and norm weight random values, in place.

    transformers initialises biases to 0 and RMSNorm weights to 1, so a freshly built checkpoint
    cannot tell a runtime that drops a bias, or swaps two norms, from a correct one.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
            elif name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=g))
    model.save_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A function `(family, dtype=torch.float32, randomize=True, **overrides) -> Path` of a saved tiny
    checkpoint; `overrides` go to the family's transformers config, `randomize` gives biases and norm
    weights random values (see randomize_norms_and_biases).

    Each distinct set of arguments is built once per session and shared; treat the folder as
    read-only (copy it into tmp_path before changing anything in it).
    """
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: torch.dtype = torch.float32, randomize: bool = True, **overrides) -> Path:
        if family not in FAMILIES:
            raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        key = (family, dtype, randomize, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            name = f"{family}-{str(dtype).removeprefix('torch.')}-{len(cache)}"
            path = make_checkpoint(family, tmp_path_factory.mktemp(name), dtype=dtype, **overrides)
            if randomize:
                randomize_norms_and_biases(path, dtype)
            cache[key] = path
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


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module (restored after it): for tests of many tiny forwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct's folder in the model store ($HAT_HOME), pulled first if missing. Where it cannot be
    had the test is skipped, except while CI is set: there the real-model tests must run, so it fails."""
    import os

    from hat.common.model_store import DEFAULT_MODEL, resolve_model

    try:
        return resolve_model(DEFAULT_MODEL, pull_missing=True)
    except (OSError, RuntimeError, ValueError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{DEFAULT_MODEL} could not be obtained, and CI must run the real-model tests: {exc}")
        pytest.skip(f"{DEFAULT_MODEL} could not be obtained: {exc}")


@pytest.fixture(scope="session")
def reference_cloud(tmp_path_factory):
    """A loopback cloud (tests/cluster.py) of the reference model's default split, as shipped (bfloat16), started
    once per session for the tests that generate with the reference model: its start-up profile alone takes seconds
    (1024-token chunks through nine bfloat16 layers). Its registry and latency fit carry what earlier tests left;
    tests must not stop it, and those that need a fresh cloud start their own."""
    from cluster import running_cloud
    from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir

    with running_cloud(reference_model_dir(), DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS,
                       tmp_path_factory.mktemp("reference-cloud")) as cluster:
        yield cluster
