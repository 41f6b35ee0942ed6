"""`hat keys generate|add|revoke|list` and the key files behind them: what a cloud's AllowList admits follows the
folder, live, and the commands refuse what would weaken trust (secret files, silent key swaps, keys without certs)."""
from __future__ import annotations

import json
import shutil
import stat

import pytest

from hat.cli.main import main
from hat.cloud import allow_list
from hat.cloud.allow_list import AllowList
from hat.common.keys import KeyFileError, load_identity, load_public, load_server


def _generate(folder, name, *extra):
    assert main(["keys", "generate", "--out", str(folder), "--name", name, *extra]) == 0
    return load_public(folder / f"{name}.key")


def _list(keys, capsys) -> dict:
    capsys.readouterr()
    assert main(["keys", "list", "--keys", str(keys), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_writes_public_and_secret_files_and_round_trips(tmp_path, capsys):
    _generate(tmp_path, "dev-1")
    out = capsys.readouterr().out
    assert "never copy" in out and "hat keys add --keys CLOUD_KEYS" in out and "--server" in out
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"dev-1.key", "dev-1.crt", "dev-1.key_secret", "dev-1.tls_key"}
    for secret in ("dev-1.key_secret", "dev-1.tls_key"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600
    identity = load_identity(tmp_path)
    assert identity.name == "dev-1" and len(identity.public.curve_public) == 40 and len(identity.curve_secret) == 40
    assert identity.public == load_public(tmp_path / "dev-1.key")
    assert b"PRIVATE KEY" in identity.tls_key


def test_generate_refuses_to_overwrite_unless_forced_and_refuses_bad_names(tmp_path, capsys):
    first = _generate(tmp_path, "dev-1")
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "dev-1"]) == 2
    assert "already holds keys" in capsys.readouterr().err
    assert load_public(tmp_path / "dev-1.key") == first
    second = _generate(tmp_path, "dev-1", "--force")
    assert second.curve_public != first.curve_public
    for bad in ("../escape", "-dash", "", "a b", "x" * 65):
        assert main(["keys", "generate", "--out", str(tmp_path / "bad"), f"--name={bad}"]) == 2
        assert "key name" in capsys.readouterr().err


def test_the_certificate_is_x509_with_the_name_as_common_name(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    public = _generate(tmp_path, "cloud.example")
    cert = x509.load_pem_x509_certificate(public.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cloud.example"
    assert cert.issuer == cert.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["cloud.example"]


def test_add_revoke_readd_and_list_drive_a_live_allow_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(allow_list, "RECHECK_S", 0)  # every lookup checks the folder
    cloud, devices = tmp_path / "cloud", tmp_path / "devices"
    _generate(cloud, "cloud-1")
    dev1, dev2 = _generate(devices, "dev-1"), _generate(devices, "dev-2")
    live = AllowList(cloud)
    assert live.by_curve_key(dev1.curve_public) is None

    assert main(["keys", "add", "--keys", str(cloud), str(devices / "dev-1.key")]) == 0
    assert "dev-1" in capsys.readouterr().out
    assert main(["keys", "add", "--keys", str(cloud), str(devices / "dev-2.key")]) == 0
    assert live.by_curve_key(dev1.curve_public) == dev1 and live.by_curve_key(dev2.curve_public) == dev2
    assert AllowList(cloud).by_curve_key(dev1.curve_public) == dev1
    assert live.certificates() == dev1.certificate + dev2.certificate and live.names() == ["dev-1", "dev-2"]
    assert not [p for p in (cloud / "allowed").iterdir() if p.name.endswith(".tmp")]  # no temporaries left
    listing = _list(cloud, capsys)
    assert listing["identity"]["name"] == "cloud-1" and listing["server"] is None
    assert listing["allowed"] == [{"name": "dev-1", "curve_public": dev1.curve_public.decode()},
                                  {"name": "dev-2", "curve_public": dev2.curve_public.decode()}]
    assert listing["revoked"] == []

    assert main(["keys", "revoke", "--keys", str(cloud), "dev-1"]) == 0
    assert "refuse" in capsys.readouterr().out
    assert live.by_curve_key(dev1.curve_public) is None and live.by_curve_key(dev2.curve_public) == dev2
    assert AllowList(cloud).by_curve_key(dev1.curve_public) is None
    assert sorted(p.name for p in (cloud / "revoked").iterdir()) == ["dev-1.crt", "dev-1.key"]
    listing = _list(cloud, capsys)
    assert [d["name"] for d in listing["allowed"]] == ["dev-2"]
    assert listing["revoked"] == [{"name": "dev-1", "curve_public": dev1.curve_public.decode()}]
    assert main(["keys", "revoke", "--keys", str(cloud), "dev-1"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert main(["keys", "revoke", "--keys", str(cloud), "../cloud-1"]) == 2

    assert main(["keys", "add", "--keys", str(cloud), str(devices / "dev-1.key")]) == 0  # re-admitting is explicit
    assert "re-admitted" in capsys.readouterr().out
    assert live.by_curve_key(dev1.curve_public) == dev1
    assert list((cloud / "revoked").iterdir()) == []
    listing = _list(cloud, capsys)
    assert [d["name"] for d in listing["allowed"]] == ["dev-1", "dev-2"] and listing["revoked"] == []

    assert main(["keys", "list", "--keys", str(cloud)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ROLE", "NAME", "FINGERPRINT"]
    assert ["allowed", "dev-1", dev1.fingerprint] in [line.split() for line in table]


def test_add_refuses_secret_files_key_swaps_and_keys_without_certificates(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(allow_list, "RECHECK_S", 0)
    cloud, old, new = tmp_path / "cloud", tmp_path / "old", tmp_path / "new"
    original, impostor = _generate(old, "dev-1"), _generate(new, "dev-1")
    capsys.readouterr()
    assert main(["keys", "add", "--keys", str(cloud), str(old / "dev-1.key_secret")]) == 2
    assert "is a secret key" in capsys.readouterr().err
    assert not (cloud / "allowed").exists() or not list((cloud / "allowed").iterdir())

    assert main(["keys", "add", "--keys", str(cloud), str(old / "dev-1.key")]) == 0
    assert main(["keys", "add", "--keys", str(cloud), str(old / "dev-1.key")]) == 0  # the same key again: fine
    live = AllowList(cloud)
    capsys.readouterr()
    assert main(["keys", "add", "--keys", str(cloud), str(new / "dev-1.key")]) == 2
    assert "different key" in capsys.readouterr().err
    assert live.by_curve_key(original.curve_public) == original and live.by_curve_key(impostor.curve_public) is None
    assert main(["keys", "add", "--keys", str(cloud), "--force", str(new / "dev-1.key")]) == 0
    assert live.by_curve_key(original.curve_public) is None and live.by_curve_key(impostor.curve_public) == impostor

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(old / "dev-1.key", lone / "dev-1.key")
    assert main(["keys", "add", "--keys", str(cloud), "--force", str(lone / "dev-1.key")]) == 2
    assert "dev-1.crt is missing" in capsys.readouterr().err
    assert main(["keys", "add", "--keys", str(cloud), str(tmp_path / "nothing.key")]) == 2
    assert live.by_curve_key(impostor.curve_public) == impostor


def test_add_server_installs_the_one_cloud_a_device_trusts(tmp_path, capsys):
    device, clouds = tmp_path / "device", tmp_path / "clouds"
    _generate(device, "dev-1")
    first, second = _generate(clouds, "cloud-a"), _generate(clouds, "cloud-b")
    with pytest.raises(KeyFileError):
        load_server(device)
    assert main(["keys", "add", "--keys", str(device), "--server", str(clouds / "cloud-a.key")]) == 0
    assert load_server(device) == first
    assert main(["keys", "add", "--keys", str(device), "--server", str(clouds / "cloud-b.key")]) == 0
    assert load_server(device) == second
    assert sorted(p.name for p in (device / "server").iterdir()) == ["cloud-b.crt", "cloud-b.key"]
    assert not (device / "allowed").exists()
    listing = _list(device, capsys)
    assert listing["identity"]["name"] == "dev-1" and listing["server"]["name"] == "cloud-b"
    assert listing["allowed"] == [] and listing["revoked"] == []
    assert main(["keys", "list", "--keys", str(tmp_path / "missing")]) == 2


def test_a_revocation_made_while_the_allow_list_reloads_shows_at_the_next_lookup(tmp_path, monkeypatch):
    """The folder's stamp is taken before the keys are read, so a revoke racing a reload is not lost."""
    monkeypatch.setattr(allow_list, "RECHECK_S", 0)
    cloud, devices = tmp_path / "cloud", tmp_path / "devices"
    dev1, dev2 = _generate(devices, "dev-1"), _generate(devices, "dev-2")
    assert main(["keys", "add", "--keys", str(cloud), str(devices / "dev-1.key")]) == 0
    live, real_load = AllowList(cloud), allow_list.load_public

    def load_then_revoke(path):
        public = real_load(path)
        if public.name == "dev-1":  # read as allowed, revoked before the reload ends
            monkeypatch.setattr(allow_list, "load_public", real_load)
            assert main(["keys", "revoke", "--keys", str(cloud), "dev-1"]) == 0
        return public

    monkeypatch.setattr(allow_list, "load_public", load_then_revoke)
    assert main(["keys", "add", "--keys", str(cloud), str(devices / "dev-2.key")]) == 0
    live.by_curve_key(dev2.curve_public)  # this lookup's reload races the revoke
    assert live.by_curve_key(dev1.curve_public) is None and live.by_curve_key(dev2.curve_public) == dev2
