"""The devices a cloud admits: the public keys in KEYS/allowed (`hat keys add`, `hat keys revoke`), re-read when
the folder changes, so a revocation applies to the next handshake and the next message without a restart."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from hat.common.keys import ALLOWED_DIR, PUBLIC_CURVE, KeyFileError, PublicKeys, load_public

log = logging.getLogger(__name__)
RECHECK_S = 0.5  # at most this often, a lookup looks at the folder's modification time


class AllowList:
    def __init__(self, keys_dir: str | Path):
        self.folder = Path(keys_dir) / ALLOWED_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._by_curve: dict[bytes, PublicKeys] = {}
        self._reload()

    def _folder_stamp(self) -> tuple:
        entries = []
        for p in self.folder.iterdir():
            try:  # the inode too: a replaced file can keep its name and (coarse) mtime
                st = p.stat()
            except FileNotFoundError:  # moved or replaced while listing (`hat keys revoke`, `hat keys add`)
                continue
            entries.append((p.name, st.st_ino, st.st_mtime_ns))
        return self.folder.stat().st_mtime_ns, tuple(sorted(entries))

    def _reload(self) -> None:
        stamp = self._folder_stamp()  # before reading: a change made while reading shows at the next check
        keys = {}
        for path in sorted(self.folder.glob("*" + PUBLIC_CURVE)):
            try:
                public = load_public(path)
            except (KeyFileError, OSError) as exc:  # one bad (or just removed) file must not lock every device out
                log.warning("ignoring %s: %s", path, exc)
                continue
            keys[public.curve_public] = public
        self._by_curve, self._stamp, self._checked = keys, stamp, time.monotonic()

    def _fresh(self) -> dict[bytes, PublicKeys]:
        with self._lock:
            if time.monotonic() - self._checked >= RECHECK_S:
                self._checked = time.monotonic()
                if self._folder_stamp() != self._stamp:
                    self._reload()
                    log.info("allow-list reloaded: %d devices", len(self._by_curve))
            return self._by_curve

    def by_curve_key(self, curve_public: bytes) -> PublicKeys | None:
        """The allowed device with this Z85 CURVE public key, or None."""
        return self._fresh().get(curve_public)

    def certificates(self) -> bytes:
        """Every allowed device's certificate, concatenated: the control plane's TLS trust store."""
        return b"".join(p.certificate for p in self._fresh().values())

    def names(self) -> list[str]:
        return sorted(p.name for p in self._fresh().values())
