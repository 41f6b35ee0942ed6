"""A workload replayed on emulated devices behind their links: one process per device, all released at once.

Used by every system's run (testbed/experiment.py for split systems, testbed/cloud_only.py for cloud-only); it
knows nothing of the cloud behind `data_address`.
"""
from __future__ import annotations

import json
import queue
import time
from pathlib import Path

from .emulated_device import DeviceJob
from .link_shim import LinkShim
from .process_context import DEVICE_PRELOAD, process_context
from .records import ExperimentRecord
from .scenario import Scenario
from .systems import SYSTEMS
from .workloads import WorkloadRequest

READY_TIMEOUT_S = 300.0  # longest wait for every device to load, register and warm up
REQUEST_TIMEOUT_S = 600.0  # a system's run may last the arrivals' span plus this long


def replay_on_devices(scenario: Scenario, name: str, requests: list[WorkloadRequest], device_dir: Path, work: Path,
                      bar, target, data_address: str, control_port: int = 0,
                      mean_prompt: int = 0) -> list[ExperimentRecord]:
    """One process per device running `target(job, ready, go, start_at)` on its share of the requests (round-robin),
    behind its group's port of one LinkShim in front of `data_address`; all released at once and followed through
    their result files. The records in workload order."""
    system, count = SYSTEMS[name], scenario.device_count
    context = process_context(DEVICE_PRELOAD)
    ready, go, start_at = context.Queue(), context.Event(), context.Value("d", 0.0)
    result_paths = [work / f"{name}-device{i}.jsonl" for i in range(count)]
    processes = []
    # one shim process, one port per device group: every device through a port gets a link of its own
    shim = LinkShim(data_address, [group.link.profile(seed=g) for g, group in enumerate(scenario.devices)]).start()
    try:
        index = 0
        for g, group in enumerate(scenario.devices):
            for _ in range(group.count):
                mine = tuple((i, r.arrival_s, r.prompt_ids, r.max_new_tokens)
                             for i, r in enumerate(requests) if i % count == index)
                job = DeviceJob(index, str(device_dir), group.schedule(), system, shim.ports[g], control_port,
                                mine, mean_prompt, str(result_paths[index]), scenario.device_threads)
                process = context.Process(target=target, args=(job, ready, go, start_at), daemon=True)
                process.start()
                processes.append(process)
                index += 1
        _wait_ready(ready, processes)
        start_at.value = time.time()
        go.set()
        deadline = time.monotonic() + requests[-1].arrival_s + REQUEST_TIMEOUT_S
        done = 0
        while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
            time.sleep(0.5)
            done = _count_lines(result_paths, bar, done)
        _count_lines(result_paths, bar, done)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        shim.stop()
    return _collect_records(name, requests, count, result_paths)


def _wait_ready(ready, processes) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = len(processes)
    while pending:
        try:
            ready.get(timeout=1.0)
            pending -= 1
        except queue.Empty:
            dead = [p for p in processes if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{len(dead)} emulated devices died while starting (see their output above)"
                                   if dead else f"emulated devices not ready within {READY_TIMEOUT_S:g} s")


def _count_lines(paths: list[Path], bar, done: int) -> int:
    now = sum(len(p.read_text().splitlines()) for p in paths if p.exists())
    bar.update(now - done)
    return now


def _collect_records(name: str, requests: list[WorkloadRequest], count: int,
                     result_paths: list[Path]) -> list[ExperimentRecord]:
    """The devices' records in workload order; a request with none is recorded as failed."""
    found = {r.request: r for path in result_paths if path.exists()
             for r in (ExperimentRecord.from_json(json.loads(line)) for line in path.read_text().splitlines())}
    return [found.get(i) or ExperimentRecord(name, i, i % count, "", r.arrival_s, 0.0, 0.0, len(r.prompt_ids), 0,
                                             float("nan"), float("nan"), error="never ran (device failed or timed out)")
            for i, r in enumerate(requests)]
