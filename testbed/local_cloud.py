"""A `hat cloud serve` child process on loopback, for the demo, benchmarks and experiments."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 120.0  # longest wait for the cloud process to load its bundle and bind
STOP_TIMEOUT_S = 10.0  # longest wait for a clean exit after SIGTERM before it is killed


@dataclass(frozen=True, slots=True)
class LocalCloud:
    pid: int  # the cloud process
    data_port: int  # its ZeroMQ data-plane port on 127.0.0.1
    control_port: int  # its gRPC control-plane port on 127.0.0.1


@contextmanager
def local_cloud_process(cloud_bundle: str | Path, threads: int = 0):
    """Start the cloud on free loopback ports, yield a LocalCloud once it is serving, stop it on exit."""
    cloud = subprocess.Popen(
        [sys.executable, "-m", "hat.cli.main", "cloud", "serve", "--bundle", str(cloud_bundle),
         "--data", "tcp://127.0.0.1:0", "--control", "127.0.0.1:0", "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        data_port, control_port = wait_ready(cloud)
        yield LocalCloud(cloud.pid, data_port, control_port)
    finally:
        cloud.terminate()
        try:
            cloud.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            cloud.kill()


def wait_ready(cloud: subprocess.Popen) -> tuple[int, int]:
    """Read the cloud's output until its `ready` line; return (data port, control port)."""
    lines: list[str] = []
    timer = threading.Timer(READY_TIMEOUT_S, cloud.kill)
    timer.start()
    try:
        for line in cloud.stdout:
            lines.append(line)
            match = re.match(r"ready data=tcp://[^:]+:(\d+) control=\S+:(\d+)", line)
            if match:
                threading.Thread(target=lambda: [None for _ in cloud.stdout], daemon=True).start()  # keep draining
                return int(match.group(1)), int(match.group(2))
    finally:
        timer.cancel()
    raise RuntimeError("the cloud server did not start:\n" + "".join(lines[-20:]))
