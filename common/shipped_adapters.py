"""Draft adapters shipped inside the package for store models, installed into the store's model folder.

`hat pull` converts a model into the store; the adapters this package ships for it (common/adapters/NAME/kK-mM:
adapter_config.json, adapter.safetensors, token_frequencies.json, the training summary and card) are copied into
MODEL/adapters/kK-mM, where a checkpoint keeps its own (hat.common.split.default_adapter_dir), so `hat split`,
`hat demo` and the benchmarks pick them up. `resolve_model` installs them too, so a store filled by an older version
gets the adapters of the installed one. A folder there without SHIPPED_MARKER is the user's own: never replaced.
The adapter's source fingerprint still decides at split and load time whether it fits the checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

SHIPPED_ROOT = Path(__file__).parent / "adapters"  # package data: adapters/NAME/kK-mM/
SHIPPED_MARKER = "SHIPPED"  # in an installed copy: which shipped adapter it is (its weights' size and config)


def shipped_adapters(name: str) -> list[Path]:
    """The adapter folders the package ships for the store model `name`."""
    folder = SHIPPED_ROOT / name
    return sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file()) if folder.is_dir() else []


def _identity(folder: Path) -> str:
    weights = folder / "adapter.safetensors"
    return f"{weights.stat().st_size}\n{(folder / 'adapter_config.json').read_text()}"


def pending_adapters(name: str, model_dir: Path) -> list[Path]:
    """The shipped adapters of `name` missing from MODEL/adapters/, or installed there from another version (a
    folder without the marker is the user's own: never pending)."""
    out = []
    for source in shipped_adapters(name):
        target = Path(model_dir) / "adapters" / source.name
        marker = target / SHIPPED_MARKER
        if not target.exists() or (marker.is_file() and marker.read_text() != _identity(source)):
            out.append(source)
    return out


def install_shipped_adapters(name: str, model_dir: Path) -> list[Path]:
    """Copy the pending shipped adapters of `name` into MODEL/adapters/ (each swapped in whole); returns them."""
    installed = []
    for source in pending_adapters(name, model_dir):
        target = Path(model_dir) / "adapters" / source.name
        staged = target.parent / f".{source.name}.staged"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)
        (staged / SHIPPED_MARKER).write_text(_identity(source))
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
        installed.append(target)
    return installed
