"""Key pairs of clouds and devices: a CURVE key pair for the ZeroMQ data plane and a self-signed X.509 certificate
for TLS on the gRPC control plane, in one folder per party (`hat keys generate`).

    NAME.key         public: the CURVE public key (ZeroMQ's certificate format) and the name
    NAME.crt         public: the TLS certificate (common name and DNS name = NAME), PEM
    NAME.key_secret  secret: the CURVE secret key (with the public one), mode 0600
    NAME.tls_key     secret: the TLS private key (EC P-256), PEM, mode 0600

Public files are what others are given: a cloud keeps its devices' public files in `allowed/` (`hat keys add`)
and a device keeps its cloud's in `server/` (`hat keys add --server`). Trust is by exact key: the cloud's TLS
trust store is its devices' own certificates, and devices pin the cloud's.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

PUBLIC_CURVE, SECRET_CURVE, CERTIFICATE, TLS_KEY = ".key", ".key_secret", ".crt", ".tls_key"
ALLOWED_DIR, REVOKED_DIR, SERVER_DIR = "allowed", "revoked", "server"  # a cloud's devices; a device's cloud
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # key names: also device ids and DNS-safe
CERT_DAYS = 3650  # validity of a generated certificate


class KeyFileError(ValueError):
    """A key folder or key file that is missing, malformed, or of the wrong kind."""


@dataclass(frozen=True, slots=True)
class PublicKeys:
    """What a party shows others: its name, CURVE public key (Z85 text) and TLS certificate (PEM bytes)."""
    name: str  # key name: the device id of a device
    curve_public: bytes  # 40-byte Z85 CURVE public key
    certificate: bytes  # PEM certificate, self-signed, CN = name

    @property
    def fingerprint(self) -> str:
        """Short id of the CURVE key, for listings and logs."""
        return self.curve_public.decode()[:12]


@dataclass(frozen=True, slots=True)
class Identity:
    """A party's own keys: its public keys and the secrets behind them."""
    public: PublicKeys  # what it shows others
    curve_secret: bytes  # 40-byte Z85 CURVE secret key
    tls_key: bytes  # PEM private key of its certificate

    @property
    def name(self) -> str:
        return self.public.name


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise KeyFileError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _self_signed(name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): EC P-256, CN and DNS name = name, a trust anchor of its own."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # its own trust anchor
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def generate_identity(folder: str | Path, name: str, overwrite: bool = False) -> Identity:
    """Write NAME's four key files into `folder` (created); refuses to replace existing keys unless `overwrite`."""
    import zmq

    check_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / (name + suffix) for suffix in (PUBLIC_CURVE, SECRET_CURVE, CERTIFICATE, TLS_KEY)]
    if not overwrite and any(p.exists() for p in paths):
        raise KeyFileError(f"{folder} already holds keys named {name!r}: pick another name or remove them first")
    public, secret = zmq.curve_keypair()
    certificate, tls_key = _self_signed(name)
    paths[0].write_text(f"# hat CURVE public key of {name}\nname = \"{name}\"\ncurve\n    public-key = \"{public.decode()}\"\n")
    _write_secret(paths[1], (f"# hat CURVE secret key of {name}: never give this file away\nname = \"{name}\"\ncurve\n"
                             f"    public-key = \"{public.decode()}\"\n    secret-key = \"{secret.decode()}\"\n").encode())
    paths[2].write_bytes(certificate)
    _write_secret(paths[3], tls_key)
    return Identity(PublicKeys(name, public, certificate), secret, tls_key)


def _field(text: str, key: str, path: Path) -> bytes:
    match = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', text, re.MULTILINE)
    if not match:
        raise KeyFileError(f"{path} is not a hat key file: no {key}")
    return match.group(1).encode()


def load_public(path: str | Path) -> PublicKeys:
    """NAME.key and the NAME.crt beside it."""
    path = Path(path)
    if path.name.endswith(SECRET_CURVE):
        raise KeyFileError(f"{path} is a secret key: give the public NAME{PUBLIC_CURVE} file instead")
    if not path.name.endswith(PUBLIC_CURVE) or not path.is_file():
        raise KeyFileError(f"{path}: expected a public key file NAME{PUBLIC_CURVE} (from `hat keys generate`)")
    text = path.read_text()
    name = check_name(_field(text, "name", path).decode())
    curve_public = _field(text, "public-key", path)
    if len(curve_public) != 40:
        raise KeyFileError(f"{path}: the CURVE public key must be 40 Z85 characters")
    cert_path = path.with_name(name + CERTIFICATE)
    if not cert_path.is_file():
        raise KeyFileError(f"{cert_path} is missing: a key's {CERTIFICATE} travels with its {PUBLIC_CURVE}")
    return PublicKeys(name, curve_public, cert_path.read_bytes())


def load_identity(folder: str | Path) -> Identity:
    """The one identity (NAME.key_secret and its siblings) at the top of `folder`."""
    folder = Path(folder)
    secrets = sorted(folder.glob("*" + SECRET_CURVE)) if folder.is_dir() else []
    if len(secrets) != 1:
        raise KeyFileError(f"{folder} must hold exactly one NAME{SECRET_CURVE} (found {len(secrets)}): make one with "
                        "`hat keys generate --out FOLDER --name NAME`")
    name = secrets[0].name[:-len(SECRET_CURVE)]
    text = secrets[0].read_text()
    public = load_public(folder / (name + PUBLIC_CURVE))
    tls_key = folder / (name + TLS_KEY)
    if not tls_key.is_file():
        raise KeyFileError(f"{tls_key} is missing")
    return Identity(public, _field(text, "secret-key", secrets[0]), tls_key.read_bytes())


def load_server(folder: str | Path) -> PublicKeys:
    """The cloud a device trusts: the one public key in FOLDER/server (`hat keys add --server`)."""
    keys = sorted((Path(folder) / SERVER_DIR).glob("*" + PUBLIC_CURVE))
    if len(keys) != 1:
        raise KeyFileError(f"{Path(folder) / SERVER_DIR} must hold the cloud's public key (found {len(keys)}): "
                        f"`hat keys add --keys {folder} --server CLOUD_KEYS/NAME{PUBLIC_CURVE}`")
    return load_public(keys[0])


# --- where keys are required ---

class SecurityConfigError(ValueError):
    """Keys missing where an address is reachable from other machines."""


def is_loopback(address: str) -> bool:
    """Whether a bind or connect address (tcp://HOST:PORT, HOST:PORT, ipc://, inproc://) stays on this machine."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface name (tcp://eth0:5555, tcp://*:5555): reachable
        return False


def require_keys(addresses: list[str], keys_dir: str, insecure: bool, who: str) -> None:
    """Refuse to run unencrypted on an address other machines can reach, unless told --insecure."""
    exposed = [a for a in addresses if a and not is_loopback(a)]
    if exposed and not keys_dir and not insecure:
        raise SecurityConfigError(
            f"{who}: {', '.join(exposed)} is not loopback, and there are no keys to encrypt it: give --keys KEYS "
            "(`hat keys generate`, then `hat keys add`; see `hat keys --help`) or, on a trusted network only, --insecure")
