"""`hat keys ACTION`: the key folders of clouds and devices. `generate` makes a party's identity (CURVE key pair and
TLS certificate); `add` lets a cloud admit a device (KEYS/allowed) or a device trust its cloud (KEYS/server, with
--server); `revoke` moves a device to KEYS/revoked, which a running cloud notices at once; `list` shows a folder."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from hat.common.keys import (ALLOWED_DIR, CERTIFICATE, PUBLIC_CURVE, REVOKED_DIR, SECRET_CURVE, SERVER_DIR, TLS_KEY,
                             KeyFileError, PublicKeys, check_name, generate_identity, load_identity, load_public)


def add_parser(commands) -> None:
    group = commands.add_parser("keys", help="make key pairs; admit, revoke and list the devices a cloud trusts")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("generate", help="write a new identity: NAME.key, NAME.crt (public) and secrets")
    p.add_argument("--out", required=True, help="key folder to write into (created)")
    p.add_argument("--name", required=True, help="key name: the device id of a device, the DNS name of a cloud")
    p.add_argument("--force", action="store_true", help="replace existing keys of the same name")
    p.set_defaults(run=run_generate)
    p = actions.add_parser("add", help="admit a device's public key (KEYS/allowed), or with --server set the cloud's")
    p.add_argument("--keys", required=True, help="key folder of the party that is to trust the key")
    p.add_argument("public_key", metavar="PUBLIC_KEY_FILE", help=f"NAME{PUBLIC_CURVE}, with NAME{CERTIFICATE} beside it")
    p.add_argument("--server", action="store_true", help="the key is the cloud's: replaces the trusted cloud key")
    p.add_argument("--force", action="store_true", help="replace a different key already allowed under NAME")
    p.set_defaults(run=run_add)
    p = actions.add_parser("revoke", help="stop admitting a device: moves its keys to KEYS/revoked")
    p.add_argument("--keys", required=True, help="the cloud's key folder")
    p.add_argument("name", metavar="NAME", help="the device's key name")
    p.set_defaults(run=run_revoke)
    p = actions.add_parser("list", help="show a key folder's identity, trusted cloud, allowed and revoked devices")
    p.add_argument("--keys", required=True, help="key folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_list)


def run_generate(args) -> int:
    identity = generate_identity(args.out, args.name, overwrite=args.force)
    base = Path(args.out) / identity.name
    print(f"identity {identity.name} (CURVE {identity.public.fingerprint}) written to {args.out}:\n"
          f"  public, hand these out:      {base}{PUBLIC_CURVE}  {base}{CERTIFICATE}\n"
          f"  secret, never copy these:    {base}{SECRET_CURVE}  {base}{TLS_KEY}\n"
          f"next (copy {identity.name}{PUBLIC_CURVE} and {identity.name}{CERTIFICATE} together):\n"
          f"  a cloud: on each device, `hat keys add --keys DEVICE_KEYS --server {base}{PUBLIC_CURVE}`\n"
          f"  a device: on the cloud, `hat keys add --keys CLOUD_KEYS {base}{PUBLIC_CURVE}`")
    if len(list(Path(args.out).glob("*" + SECRET_CURVE))) > 1:
        print(f"warning: {args.out} now holds more than one identity; a cloud or device needs exactly one",
              file=sys.stderr)
    return 0


def write_atomically(target: Path, data: bytes) -> None:
    """Readers of `target` see the old file or the new one, never a part: a temporary file beside it, replaced in."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # not *.key: unseen
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def install_public(public: PublicKeys, source: Path, folder: Path) -> None:
    """NAME.crt first, then NAME.key: a reader that finds the key finds its certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / (public.name + CERTIFICATE), public.certificate)
    write_atomically(folder / (public.name + PUBLIC_CURVE), source.read_bytes())


def remove_keys(folder: Path, name: str) -> None:
    """NAME.key first, then NAME.crt (readers look for keys, then their certificates)."""
    for suffix in (PUBLIC_CURVE, CERTIFICATE):
        with contextlib.suppress(FileNotFoundError):
            (folder / (name + suffix)).unlink()


def check_no_other_key(public: PublicKeys, allowed: Path, force: bool) -> None:
    existing = allowed / (public.name + PUBLIC_CURVE)
    if not existing.exists() or force:
        return
    try:
        same = load_public(existing).curve_public == public.curve_public
    except KeyFileError:
        same = False
    if not same:
        raise KeyFileError(f"{existing} holds a different key for {public.name!r}: revoke it first, or add --force "
                           "to replace it")


def run_add(args) -> int:
    source = Path(args.public_key)
    public = load_public(source)
    keys = Path(args.keys)
    if args.server:  # a device trusts exactly one cloud
        folder = keys / SERVER_DIR
        install_public(public, source, folder)
        for old in sorted(folder.glob("*" + PUBLIC_CURVE)):
            if old.name != public.name + PUBLIC_CURVE:
                remove_keys(folder, old.name[:-len(PUBLIC_CURVE)])
        print(f"cloud {public.name} ({public.fingerprint}) is now the one server {keys} trusts")
        return 0
    allowed = keys / ALLOWED_DIR
    check_no_other_key(public, allowed, args.force)
    install_public(public, source, allowed)
    readmitted = (keys / REVOKED_DIR / (public.name + PUBLIC_CURVE)).exists()
    remove_keys(keys / REVOKED_DIR, public.name)
    print(f"device {public.name} ({public.fingerprint}) {'re-admitted' if readmitted else 'allowed'} in {allowed}")
    return 0


def run_revoke(args) -> int:
    name = check_name(args.name)
    allowed, revoked = Path(args.keys) / ALLOWED_DIR, Path(args.keys) / REVOKED_DIR
    if not (allowed / (name + PUBLIC_CURVE)).is_file():
        raise KeyFileError(f"{name!r} is not allowed in {allowed}")
    revoked.mkdir(parents=True, exist_ok=True)
    for suffix in (PUBLIC_CURVE, CERTIFICATE):  # the key first: the allow-list only looks at keys
        with contextlib.suppress(FileNotFoundError):
            os.replace(allowed / (name + suffix), revoked / (name + suffix))
    print(f"device {name} revoked: a running cloud refuses its new connections and the next message of a "
          "connected one")
    return 0


def read_public_keys(folder: Path) -> list[PublicKeys]:
    """The readable public keys in `folder`, as the cloud sees them; unreadable ones are named on stderr."""
    found = []
    for path in sorted(folder.glob("*" + PUBLIC_CURVE)):
        try:
            found.append(load_public(path))
        except KeyFileError as exc:
            print(f"ignoring {path}: {exc}", file=sys.stderr)
    return found


def run_list(args) -> int:
    keys = Path(args.keys)
    if not keys.is_dir():
        raise FileNotFoundError(f"{keys}: no such key folder")
    identity = load_identity(keys).public if any(keys.glob("*" + SECRET_CURVE)) else None
    servers = read_public_keys(keys / SERVER_DIR)
    sections = {"identity": [identity] if identity else [], "server": servers,
                "allowed": read_public_keys(keys / ALLOWED_DIR), "revoked": read_public_keys(keys / REVOKED_DIR)}
    if len(servers) > 1:
        print(f"warning: {keys / SERVER_DIR} holds {len(servers)} keys; a device needs exactly one", file=sys.stderr)
    if args.json:
        entry = lambda p: {"name": p.name, "curve_public": p.curve_public.decode()}  # noqa: E731
        print(json.dumps({"identity": entry(identity) if identity else None,
                          "server": entry(servers[0]) if len(servers) == 1 else None,
                          "allowed": [entry(p) for p in sections["allowed"]],
                          "revoked": [entry(p) for p in sections["revoked"]]}))
        return 0
    rows = [(role, p.name, p.fingerprint) for role, found in sections.items() for p in found]
    width = max([len(name) for _, name, _ in rows] + [4])
    print(f"{'ROLE':<9} {'NAME':<{width}} FINGERPRINT")
    for role, name, fingerprint in rows:
        print(f"{role:<9} {name:<{width}} {fingerprint}")
    if not rows:
        print(f"(no keys in {keys})")
    return 0
