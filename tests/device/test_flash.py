"""`hat device flash`: the Ansible playbook in check mode against this machine (Ansible's local connection), the
systemd unit it writes through `systemd-analyze verify`, the ansible-playbook command line, and the input checks.

Check mode runs the real playbook (about 15 s on 2 cores); every other test here takes milliseconds.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hat.cli import flash_cmd
from hat.cli.main import main as hat_main
from hat.common.bundle import BundleManifest

ANSIBLE_TIMEOUT_S = 180


def _ansible_playbook() -> str | None:
    try:
        return flash_cmd.find_ansible_playbook(None)
    except RuntimeError:
        return None


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hat device")
    flash_cmd.add_flash_parser(parser.add_subparsers(dest="action", required=True))
    return parser.parse_args(["flash", *argv])


def make_bundle(path: Path, part: str = "device") -> Path:
    path.mkdir(parents=True)
    BundleManifest(part, "llama", 4, 1, 1, 8, "float32", "ab" * 32, "tiny").save(path)
    (path / "device.safetensors").write_bytes(b"not really weights")
    return path


def agent_user() -> str:
    """An existing account the unit may name: this user, or `nobody` for root (the playbook refuses to run the
    agent as root). Check mode chowns nothing, so any existing account works without privileges."""
    user = getpass.getuser()
    return "nobody" if user == "root" else user


def task_names() -> list[str]:
    tasks = yaml.safe_load((flash_cmd.ROLE_DIR / "tasks" / "main.yml").read_text())
    return [task["name"] for task in tasks]


@pytest.fixture
def target(tmp_path):
    """A local target: a bundle, a stand-in wheel and an inventory whose install dir and unit dir lie in tmp_path."""
    bundle = make_bundle(tmp_path / "bundle")
    wheel = tmp_path / "hatserve-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"check mode never installs it")
    install, units = tmp_path / "install", tmp_path / "units"
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        "[jetsons]\n"
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
        "[jetsons:vars]\n"
        "hat_cloud_host=cloud.example\n"
        "hat_become=false\n"
        "hat_create_user=false\n"
        f"hat_user={agent_user()}\n"
        "hat_require_jetpack=false\n"
        "hat_jetpack_packages=[]\n"
        f"hat_install_dir={install}\n"
        f"hat_unit_dir={units}\n"
        "hat_port=8123\n")
    keys = tmp_path / "fleet-keys"  # the folder of one device, named by its device id (the inventory's host name)
    assert hat_main(["keys", "generate", "--out", str(tmp_path / "cloud-keys"), "--name", "cloud"]) == 0
    assert hat_main(["keys", "generate", "--out", str(keys / "localhost"), "--name", "localhost"]) == 0
    assert hat_main(["keys", "add", "--keys", str(keys / "localhost"), "--server",
                     str(tmp_path / "cloud-keys" / "cloud.key")]) == 0
    return {"bundle": bundle, "wheel": wheel, "install": install, "units": units, "inventory": inventory,
            "keys": keys}


# --- (a) check mode against a local target ---

@pytest.mark.skipif(_ansible_playbook() is None, reason="ansible-playbook not installed (pip install ansible-core)")
def test_check_mode_prints_every_step_and_changes_nothing(target, tmp_path):
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / "ansible-remote"))
    done = subprocess.run(
        [sys.executable, "-m", "hat.cli.flash_cmd", "--inventory", str(target["inventory"]),
         "--bundle", str(target["bundle"]), "--wheel", str(target["wheel"]), "--keys", str(target["keys"]), "--check"],
        capture_output=True, text=True, timeout=ANSIBLE_TIMEOUT_S, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "--check --diff" in out  # the command line is printed first
    for name in task_names():
        assert f"TASK [hat_device : {name}]" in out, f"step {name!r} not in the output:\n{out}"
    assert "failed=0" in out and "unreachable=0" in out
    assert not target["install"].exists(), sorted(target["install"].rglob("*"))
    assert not target["units"].exists()
    # --diff shows the unit Ansible would write: it is the one render_unit gives for the same variables
    execstart = [line[1:] for line in out.splitlines() if line.startswith("+ExecStart=")]
    expected = flash_cmd.render_unit({"hat_install_dir": str(target["install"]), "hat_cloud_host": "cloud.example",
                                      "hat_port": 8123, "hat_user": agent_user(), "hat_device_id": "localhost",
                                      "hat_keys_root": str(target["keys"].resolve())})
    assert execstart == [line for line in expected.splitlines() if line.startswith("ExecStart=")]
    assert "--port 8123" in execstart[0] and f"--bundle {target['install']}/bundle" in execstart[0]
    assert f"--keys {target['install']}/keys" in execstart[0]
    assert "TASK [hat_device : Copy the device's keys]" in out


# --- (b) the systemd unit ---

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists and is executable: point it at this Python
    unit = flash_cmd.render_unit({"hat_cloud_host": "10.0.0.5", "hat_exec": sys.executable,
                                  "hat_install_dir": str(tmp_path), "hat_serve_extra_args": "--threads 4"})
    path = tmp_path / "hat-device.service"
    path.write_text(unit)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert not [line for line in out.splitlines() if "error" in line.lower()], out
    assert f"ExecStart={sys.executable} device serve --bundle {tmp_path}/bundle --cloud 10.0.0.5 " in unit
    for line in ("Restart=on-failure", "User=hat", "After=network-online.target jtop.service",
                 f"WorkingDirectory={tmp_path}", "NoNewPrivileges=yes", "WantedBy=multi-user.target"):
        assert line in unit.splitlines()
    # each would cut the agent off the Jetson GPU's device nodes or CUDA's writable code pages
    assert not [line for line in unit.splitlines()
                if line.startswith(("PrivateDevices=", "ProtectClock=", "DeviceAllow=", "MemoryDenyWriteExecute="))]


def test_config_renders_valid_json():
    config = json.loads(flash_cmd.render_config({"hat_cloud_host": "10.0.0.5", "hat_port": "8001",
                                                 "hat_wheel": "/tmp/x/hatserve-0.1.0-py3-none-any.whl"}))
    assert config["cloud"] == {"host": "10.0.0.5", "data_port": 5555, "control_port": 5556}
    assert config["http"] == {"host": "127.0.0.1", "port": 8001}
    assert config["bundle"] == "/opt/hat/bundle" and config["telemetry_interval_s"] == 5.0
    assert config["wheel"] == "hatserve-0.1.0-py3-none-any.whl"


def test_print_unit(capsys):
    assert flash_cmd.main(["--print-unit", "--extra", "hat_cloud_host=10.0.0.5", "--extra", "hat_port=8001"]) == 0
    out = capsys.readouterr().out
    assert "# hat-device.service" in out and "--cloud 10.0.0.5" in out and "--port 8001" in out
    assert json.loads(out[out.index("{"):])["http"]["port"] == 8001


# --- (c) the ansible-playbook command line ---

def test_playbook_command(tmp_path):
    args = parse(["--inventory", "inv.ini", "--bundle", "b/device", "--wheel", "w.whl", "--check", "--limit",
                  "orin-*", "--extra", "hat_port=8001", "--extra", "hat_serve_extra_args=--threads 4",
                  "--ansible-playbook", "/opt/ansible/bin/ansible-playbook"])
    assert flash_cmd.playbook_command(args) == [
        "/opt/ansible/bin/ansible-playbook", "-i", str(Path("inv.ini").resolve()), str(flash_cmd.PLAYBOOK),
        "-e", f"hat_wheel={Path('w.whl').resolve()}", "-e", f"hat_bundle_src={Path('b/device').resolve()}",
        "-e", "hat_backend=torch", "-e", "hat_port=8001", "-e", "hat_serve_extra_args=--threads 4",
        "--limit", "orin-*", "--check", "--diff"]
    plain = flash_cmd.playbook_command(parse(["--inventory", "inv.ini", "--bundle", "b"]), wheel="built.whl")
    assert plain[0] == "ansible-playbook" and "--check" not in plain and "--limit" not in plain
    assert "--ask-become-pass" not in plain
    asked = flash_cmd.playbook_command(parse(["--inventory", "i", "--bundle", "b", "--ask-become-pass"]), "w.whl")
    assert asked[-1] == "--ask-become-pass"
    assert f"hat_wheel={Path('built.whl').resolve()}" in plain
    assert flash_cmd.PLAYBOOK.is_file() and flash_cmd.DEFAULTS_FILE.is_file()


def test_backend_follows_the_bundle(tmp_path):
    """A bundle with `hat export-onnx`'s graphs is served by onnxruntime, one without by torch; --extra still wins."""
    bundle = tmp_path / "device"
    (bundle / "onnx").mkdir(parents=True)
    assert flash_cmd.bundle_backend(str(bundle)) == "torch"
    (bundle / "onnx" / "onnx_manifest.json").write_text("{}")
    assert flash_cmd.bundle_backend(str(bundle)) == "onnxruntime"
    argv = flash_cmd.playbook_command(parse(["--inventory", "i", "--bundle", str(bundle), "--extra", "hat_backend=torch"]),
                                      "w.whl")
    assert argv.index("hat_backend=onnxruntime") < argv.index("hat_backend=torch")  # later -e wins in Ansible


def test_extra_must_be_var_equals_value():
    with pytest.raises(ValueError, match="VAR=VALUE"):
        flash_cmd.playbook_command(parse(["--inventory", "i", "--extra", "hat_port"]))
    with pytest.raises(ValueError, match="VAR=VALUE"):
        flash_cmd.parse_extra(["not-a-name=1"])


# --- (d) clear errors before Ansible runs ---

@pytest.fixture
def fake_ansible(tmp_path):
    """An ansible-playbook stand-in that leaves a mark when it runs."""
    mark = tmp_path / "ansible-ran"
    script = tmp_path / "ansible-playbook"
    script.write_text(f"#!/bin/sh\ntouch {mark}\n")
    script.chmod(0o755)
    return script, mark


@pytest.mark.parametrize("case, message", [
    ("no inventory flag", "--inventory FILE is required"),
    ("missing inventory", "--inventory .*: no such file"),
    ("no bundle flag", "--bundle DIR is required"),
    ("missing bundle", "--bundle .*: no such folder"),
    ("not a bundle", "is not a bundle: no manifest.json"),
    ("cloud bundle", "is a cloud bundle, expected a device bundle"),
    ("missing wheel", "--wheel .*: no such wheel file"),
])
def test_bad_inputs_fail_before_ansible(target, tmp_path, fake_ansible, capsys, case, message):
    script, mark = fake_ansible
    inventory, bundle, wheel = str(target["inventory"]), str(target["bundle"]), str(target["wheel"])
    if case == "no inventory flag":
        inventory = None
    elif case == "missing inventory":
        inventory = str(tmp_path / "nope.ini")
    elif case == "no bundle flag":
        bundle = None
    elif case == "missing bundle":
        bundle = str(tmp_path / "nope")
    elif case == "not a bundle":
        bundle = str(tmp_path)
    elif case == "cloud bundle":
        bundle = str(make_bundle(tmp_path / "cloud-bundle", part="cloud"))
    elif case == "missing wheel":
        wheel = str(tmp_path / "nope.whl")
    argv = ["--wheel", wheel, "--ansible-playbook", str(script)]
    argv += ["--inventory", inventory] if inventory else []
    argv += ["--bundle", bundle] if bundle else []
    assert flash_cmd.main(argv) == 2
    err = capsys.readouterr().err
    assert "hat device flash: error:" in err
    assert re.search(message, err), err
    assert not mark.exists()


def test_run_flash_runs_the_playbook_command(target, fake_ansible):
    """With good inputs the stand-in runs (the path the errors above stop short of), and its exit code comes back."""
    script, mark = fake_ansible
    assert flash_cmd.main(["--inventory", str(target["inventory"]), "--bundle", str(target["bundle"]),
                           "--wheel", str(target["wheel"]), "--ansible-playbook", str(script)]) == 0
    assert mark.exists()


def test_missing_ansible_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(flash_cmd.shutil, "which", lambda name: None)
    monkeypatch.setattr(flash_cmd.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(RuntimeError, match="pip install ansible-core"):
        flash_cmd.find_ansible_playbook(None)
    with pytest.raises(FileNotFoundError, match="--ansible-playbook /nonexistent/ansible-playbook: no such executable"):
        flash_cmd.find_ansible_playbook("/nonexistent/ansible-playbook")
