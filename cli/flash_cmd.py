"""`hat device flash`: install the device agent on a fleet of Jetsons with Ansible.

The fleet is an Ansible inventory; the steps are the playbook hat/cli/deploy/flash.yml (role hat_device: copy the
wheel and the device bundle, a venv over JetPack's torch, the config, the systemd unit, start, GET /health). This
module only checks the inputs, builds the wheel if none is given, and runs `ansible-playbook`.
`hat device flash --print-unit` renders the systemd unit (and the config) without Ansible, for inspection.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent / "deploy"
PLAYBOOK = DEPLOY_DIR / "flash.yml"
ROLE_DIR = DEPLOY_DIR / "roles" / "hat_device"
DEFAULTS_FILE = ROLE_DIR / "defaults" / "main.yml"
UNIT_TEMPLATE = ROLE_DIR / "templates" / "hat-device.service.j2"
CONFIG_TEMPLATE = ROLE_DIR / "templates" / "hat-device.json.j2"

DEFAULT_TIMEOUT_S = 3600.0  # a whole fleet run: copying bundles and pip installs over slow links take a while
WHEEL_BUILD_TIMEOUT_S = 600.0
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def add_flash_parser(device_actions) -> None:
    """Add `flash` to the `hat device` action subparsers."""
    p = device_actions.add_parser(
        "flash", help="install the agent on Jetsons over ssh (Ansible playbook over an inventory)",
        description="Install the device agent on every host of an Ansible inventory: copy the wheel and the device "
                    "bundle, create a venv that uses JetPack's torch, write the config and a systemd unit, start it "
                    "and wait for GET /health. Run with --check first: it prints every step and changes nothing.")
    p.add_argument("--inventory", metavar="FILE",
                   help="Ansible inventory with a [jetsons] group (see hat/cli/deploy/inventory.example.ini); "
                        "required unless --print-unit")
    p.add_argument("--bundle", metavar="DIR", help="the device bundle (BUNDLE/device from `hat split`)")
    p.add_argument("--wheel", metavar="FILE",
                   help="hatserve wheel to install (default: build one from this checkout with `pip wheel . --no-deps`)")
    p.add_argument("--keys", metavar="DIR",
                   help="a folder with one key folder per device, named by its device id (the inventory name unless "
                        "hat_device_id says otherwise): `hat keys generate --out DIR/ID --name ID`, then `hat keys add "
                        "--keys DIR/ID --server CLOUD_KEYS/NAME.key`; needed for a cloud that is not on loopback")
    p.add_argument("--limit", metavar="PATTERN", help="only these hosts or groups (ansible-playbook --limit)")
    p.add_argument("--check", action="store_true",
                   help="Ansible check mode with --diff: print every step and what it would change, change nothing")
    p.add_argument("--extra", metavar="VAR=VALUE", action="append", default=[],
                   help="override a playbook variable, e.g. hat_port=8001 (repeatable; see "
                        "hat/cli/deploy/roles/hat_device/defaults/main.yml)")
    p.add_argument("--ask-become-pass", action="store_true",
                   help="ask for the sudo password of the account Ansible connects as (ansible-playbook -K)")
    p.add_argument("--ansible-playbook", metavar="PATH", default=None,
                   help="the ansible-playbook executable (default: found on PATH or beside this Python)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds the whole ansible-playbook run may take before it is stopped")
    p.add_argument("--print-unit", action="store_true",
                   help="print the systemd unit and config for the defaults plus --extra values, without Ansible")
    p.set_defaults(run=run_flash)


# --- the ansible-playbook command line ---

def parse_extra(items: list[str]) -> list[tuple[str, str]]:
    """--extra VAR=VALUE items as (VAR, VALUE) pairs; ValueError on anything else."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _VAR_NAME.match(name):
            raise ValueError(f"--extra {item!r}: expected VAR=VALUE with VAR a variable name, e.g. hat_port=8001")
        pairs.append((name, value))
    return pairs


def find_ansible_playbook(explicit: str | None) -> str:
    """The ansible-playbook to run: `explicit`, else on PATH, else beside this Python (a venv not on PATH)."""
    if explicit:
        path = shutil.which(explicit) or explicit
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"--ansible-playbook {explicit}: no such executable")
        return path
    found = shutil.which("ansible-playbook")
    if found:
        return found
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise RuntimeError("ansible-playbook not found: `pip install ansible-core` (or pip install 'hatserve[test]'), "
                       "or pass --ansible-playbook PATH")


def playbook_command(args, wheel: str | None = None) -> list[str]:
    """The ansible-playbook argv for `args` (no checks of the files: see check_inputs). `wheel` overrides args.wheel."""
    argv = [args.ansible_playbook or "ansible-playbook", "-i", str(Path(args.inventory).resolve()), str(PLAYBOOK)]
    wheel = wheel or args.wheel
    if wheel:
        argv += ["-e", f"hat_wheel={Path(wheel).resolve()}"]
    if args.bundle:
        argv += ["-e", f"hat_bundle_src={Path(args.bundle).resolve()}", "-e", f"hat_backend={bundle_backend(args.bundle)}"]
    if args.keys:
        argv += ["-e", f"hat_keys_root={Path(args.keys).resolve()}"]
    for name, value in parse_extra(args.extra):  # after ours: a user's --extra wins
        argv += ["-e", f"{name}={value}"]
    if args.limit:
        argv += ["--limit", args.limit]
    if args.check:
        argv += ["--check", "--diff"]
    if args.ask_become_pass:
        argv += ["--ask-become-pass"]
    return argv


def bundle_backend(bundle: str) -> str:
    """onnxruntime when the bundle carries `hat export-onnx`'s graphs, else torch."""
    from hat.device.onnx_manifest import ONNX_DIR, ONNX_MANIFEST

    return "onnxruntime" if (Path(bundle) / ONNX_DIR / ONNX_MANIFEST).is_file() else "torch"


def check_inputs(args) -> None:
    """Clear errors for a missing inventory, bundle or wheel, before Ansible runs."""
    from hat.common.bundle import load_manifest

    if not args.inventory:
        raise ValueError("--inventory FILE is required (an Ansible inventory; see hat/cli/deploy/inventory.example.ini)")
    if not Path(args.inventory).is_file():
        raise FileNotFoundError(f"--inventory {args.inventory}: no such file")
    if not args.bundle:
        raise ValueError("--bundle DIR is required (the device bundle, BUNDLE/device from `hat split`)")
    if not Path(args.bundle).is_dir():
        raise FileNotFoundError(f"--bundle {args.bundle}: no such folder")
    load_manifest(args.bundle, part="device")  # a folder without manifest.json, or a cloud bundle: a clear error
    if args.wheel and not (Path(args.wheel).is_file() and args.wheel.endswith(".whl")):
        raise FileNotFoundError(f"--wheel {args.wheel}: no such wheel file (*.whl)")
    if args.keys and not Path(args.keys).is_dir():
        raise FileNotFoundError(f"--keys {args.keys}: no such folder")
    if args.timeout <= 0:
        raise ValueError("--timeout must be positive")
    parse_extra(args.extra)


def project_root() -> Path | None:
    """The source checkout this hat runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def build_wheel(out_dir: Path) -> Path:
    """`pip wheel <checkout> --no-deps -w out_dir`; the wheel's path. RuntimeError when there is no checkout."""
    root = project_root()
    if root is None:
        raise RuntimeError("no --wheel given and hat is not running from a source checkout to build one from: "
                           "pass --wheel FILE (e.g. from `pip wheel . --no-deps -w dist` in the repository)")
    print(f"building the wheel from {root} ...", flush=True)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps",
                               "-w", str(out_dir)], capture_output=True, text=True, timeout=WHEEL_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"building the wheel took over {WHEEL_BUILD_TIMEOUT_S:.0f} s; pass --wheel FILE") from None
    wheels = sorted(out_dir.glob("hatserve-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"`pip wheel {root} --no-deps` failed (pass --wheel FILE instead):\n{done.stderr[-2000:]}")
    return wheels[-1]


def stream(argv: list[str], timeout_s: float) -> int:
    """Run argv, copy its output to ours line by line, stop it after timeout_s; its exit code (124: timed out)."""
    env = dict(os.environ, ANSIBLE_RETRY_FILES_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, stop)
    timer.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        proc.wait(timeout=30)  # stdout closed: the process is exiting
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    finally:
        timer.cancel()
    if timed_out.is_set():
        print(f"hat device flash: ansible-playbook stopped after --timeout {timeout_s:.0f} s", file=sys.stderr)
        return 124
    return proc.returncode


def run_flash(args) -> int:
    if args.print_unit:
        variables = dict(parse_extra(args.extra))
        if args.bundle:
            variables.setdefault("hat_bundle_src", str(Path(args.bundle).resolve()))
            variables.setdefault("hat_backend", bundle_backend(args.bundle))
        if args.keys:
            variables.setdefault("hat_keys_root", str(Path(args.keys).resolve()))
        resolved = render_defaults(variables)  # once, for both templates
        if not resolved["hat_cloud_host"]:
            print("note: hat_cloud_host is not set (--extra hat_cloud_host=HOST; the inventory sets it per host)",
                  file=sys.stderr)
        print(f"# {resolved['hat_service_name']}.service\n{_render(UNIT_TEMPLATE, resolved)}\n"
              f"# {resolved['hat_config_file']}\n{_render(CONFIG_TEMPLATE, resolved)}")
        return 0
    check_inputs(args)
    args.ansible_playbook = find_ansible_playbook(args.ansible_playbook)
    with tempfile.TemporaryDirectory(prefix="hat-wheel-") as tmp:
        wheel = args.wheel or str(build_wheel(Path(tmp)))
        argv = playbook_command(args, wheel)
        print("$ " + " ".join(argv), flush=True)
        return stream(argv, args.timeout)


# --- rendering the templates without Ansible ---

def _to_json(value, indent=None, sort_keys=False, **_) -> str:
    import json

    return json.dumps(value, indent=indent, sort_keys=sort_keys)


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y", "t")
    return bool(value)


def _environment():
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)  # as Ansible's template module
    env.filters.update(to_json=_to_json, bool=_bool, basename=os.path.basename)
    return env


def render_defaults(overrides: dict | None = None) -> dict:
    """The role's defaults with `overrides` on top, every "{{ ... }}" in them resolved (like Ansible does)."""
    import yaml

    env = _environment()
    variables = {"inventory_hostname": "localhost"}
    variables.update(yaml.safe_load(DEFAULTS_FILE.read_text()))
    variables.update(overrides or {})
    for _ in range(10):  # defaults refer to other defaults (hat_venv: "{{ hat_install_dir }}/venv"), a few deep
        resolved = {k: env.from_string(v).render(variables) if isinstance(v, str) and "{{" in v else v
                    for k, v in variables.items()}
        if resolved == variables:
            return resolved
        variables = resolved
    raise ValueError("playbook variables refer to each other in a loop")


def _render(template: Path, resolved: dict) -> str:
    return _environment().from_string(template.read_text()).render(resolved)


def render_unit(overrides: dict | None = None) -> str:
    """The systemd unit the playbook would write for these variables (the role's defaults fill the rest)."""
    return _render(UNIT_TEMPLATE, render_defaults(overrides))


def render_config(overrides: dict | None = None) -> str:
    """The agent config the playbook would write for these variables."""
    return _render(CONFIG_TEMPLATE, render_defaults(overrides))


def main(argv: list[str] | None = None) -> int:
    """`python -m hat.cli.flash_cmd ARGS`: the same as `hat device flash ARGS`, without loading the other commands."""
    parser = argparse.ArgumentParser(prog="hat device")
    add_flash_parser(parser.add_subparsers(dest="action", required=True, metavar="ACTION"))
    args = parser.parse_args(["flash", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"hat device flash: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
