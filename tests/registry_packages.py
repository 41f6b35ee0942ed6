"""Registry packages built locally for tests: pip reads them from a folder instead of any index."""
from __future__ import annotations

import zipfile

PACKAGE, VERSION, MEMBER = "hat-tiny-test-model", "0.1.0", "hat_tiny_test_model/tiny.gguf"


def build_wheel(folder, content: bytes, package: str = PACKAGE, version: str = VERSION, member: str = MEMBER):
    """A minimal valid wheel of `package` holding `content` at `member`, as a registry package would carry it."""
    dist = f"{package.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {member: content,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + f"{dist}.dist-info/RECORD,,\n")
    return path


def build_sdist(folder, content: bytes, package: str, version: str, member: str):
    """A minimal sdist (.tar.gz) of `package` holding `content` at `member` below its top folder, as an index serves
    a package that ships no wheel."""
    import io
    import tarfile

    path = folder / f"{package}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in ((f"{package}-{version}/PKG-INFO", f"Name: {package}\nVersion: {version}\n".encode()),
                           (f"{package}-{version}/{member}", content)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def simple_index(root, package: str, archive, sha256: str):
    """A PEP 503 simple index in folder `root` listing `archive` for `package` (with a sha256 fragment); its URL."""
    page = root / package
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<html><body><a href="{archive.as_uri()}#sha256={sha256}">{archive.name}</a>'
                                     "</body></html>")
    return root.as_uri()
