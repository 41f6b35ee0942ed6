"""`hat cloud serve` child processes on loopback, for the demo, benchmarks and experiments: one process
(`local_cloud_process`), or a router with prefill and decode workers (`local_disaggregated_cloud`)."""
from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 120.0  # longest wait for a cloud process to load its bundle and bind (or register)
STOP_TIMEOUT_S = 10.0  # longest wait for a clean exit after SIGTERM before it is killed
_SERVE = [sys.executable, "-m", "hat.cli.main", "cloud", "serve"]
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


@dataclass(frozen=True, slots=True)
class LocalCloud:
    pid: int  # the process devices talk to (the cloud, or the router)
    data_port: int  # its ZeroMQ data-plane port on 127.0.0.1
    control_port: int  # its gRPC control-plane port on 127.0.0.1
    metrics_url: str = ""  # its Prometheus endpoint, when asked for
    worker_pids: dict[str, int] = field(default_factory=dict)  # a disaggregated cloud's workers: name -> pid


@contextmanager
def local_cloud_process(cloud_bundle: str | Path, threads: int = 0, extra_args: tuple[str, ...] = ()):
    """Start the cloud on free loopback ports, yield a LocalCloud once it is serving, stop it on exit."""
    with _process([*_SERVE, "--bundle", str(cloud_bundle), "--data", "tcp://127.0.0.1:0", "--control", "127.0.0.1:0",
                   "--threads", str(threads), *extra_args]) as (cloud, line):
        match = re.match(r"ready data=tcp://[^:]+:(\d+) control=\S+:(\d+)", line)
        metrics = re.search(r"metrics=(\S+)", line)
        yield LocalCloud(cloud.pid, int(match.group(1)), int(match.group(2)), metrics.group(1) if metrics else "")


@contextmanager
def local_disaggregated_cloud(cloud_bundle: str | Path, prefill: int = 1, decode: int = 1, policy: str = "always",
                              threads: int = 1, worker_args: tuple[str, ...] = ()):
    """A router (with a metrics endpoint) and `prefill` + `decode` workers, each a process on loopback."""
    with ExitStack() as stack:
        router, line = stack.enter_context(_process([
            *_SERVE, "--role", "router", "--bundle", str(cloud_bundle), "--data", "tcp://127.0.0.1:0",
            "--control", "127.0.0.1:0", "--workers", "tcp://127.0.0.1:0", "--disaggregation", policy,
            "--metrics", "127.0.0.1:0"]))
        match = re.match(r"ready data=tcp://[^:]+:(\d+) control=\S+:(\d+) workers=(\S+) metrics=(\S+)", line)
        workers = {}
        for role, count in (("prefill", prefill), ("decode", decode)):
            for i in range(count):
                name = f"{role}-{i}"
                process, _ = stack.enter_context(_process([
                    *_SERVE, "--role", role, "--bundle", str(cloud_bundle), "--router", match.group(3),
                    "--worker-id", name, "--threads", str(threads), *worker_args]))
                workers[name] = process.pid
        yield LocalCloud(router.pid, int(match.group(1)), int(match.group(2)), match.group(4), workers)


@contextmanager
def _process(command: list[str]):
    """Run `command`, yield (process, its `ready` line); SIGTERM (then SIGKILL) it on exit."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        yield process, wait_ready(process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()


def _die_with_parent() -> None:
    """In the child before it runs the command: Linux sends it SIGTERM when the process that started it dies, so a
    benchmark or demo killed before its clean-up ran (SIGKILL, or SIGTERM, on which Python runs no `finally`) leaves
    no cloud behind holding the CPUs."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def wait_ready(process: subprocess.Popen) -> str:
    """Read a cloud process's output until its `ready` line and return it (then keep draining the output)."""
    lines: list[str] = []
    timer = threading.Timer(READY_TIMEOUT_S, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("ready "):
                threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
                return line.strip()
    finally:
        timer.cancel()
    raise RuntimeError(f"{' '.join(process.args[3:6])} did not start:\n" + "".join(lines[-20:]))
