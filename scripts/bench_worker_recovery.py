#!/usr/bin/env python
"""Worker recovery: the time from a worker's death to a serving pool of the requested size, with Ray and with
no supervisor, in one run.

Both clouds are a router with 1 prefill and 2 decode workers on this machine, serving the reference model
(float32, CPU: this kind of machine has no native bf16), each worker on 1 torch thread. Once all three are
registered, decode-1's process is SIGKILLed, and the router is watched:
  ray            the router keeps its workers as Ray actors (`--ray-address local`, in this process): Ray
                 restarts the actor, the pool starts its server again, it registers under its old name
  no supervisor  `hat cloud serve --role router|prefill|decode` processes started by hand (as today): nobody
                 starts decode-1 again; its sessions re-prefill on the survivors and the pool stays one short
For each it prints when the router dropped the dead process and when it served the requested 3 workers again
(or that it did not within --watch seconds). Figures come from a shared, possibly loaded machine: they are
as measured, not a bound.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

POLL_S = 0.02  # how often the router's state is read


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the reference model)")
    p.add_argument("--watch", type=float, default=30.0,
                   help="seconds the pool is watched after the kill (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="longest wait for the first 3 workers")
    return p.parse_args(argv)


def wait(condition, timeout_s: float) -> float | None:
    """Seconds until `condition()` holds, or None if it does not within `timeout_s`."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if condition():
            return time.monotonic() - began
        time.sleep(POLL_S)
    return None


def with_ray(cloud_dir: Path, args) -> tuple[float | None, float | None]:
    """(dropped, restored) seconds after SIGKILLing decode-1 in a Ray pool."""
    from hat.cloud.config import RouterConfig
    from hat.cloud.ray_config import RayPoolConfig, WorkerSettings
    from hat.cloud.ray_pool import RayWorkerPool
    from hat.cloud.router import Router

    router = Router(RouterConfig(bundle=str(cloud_dir), data_address="tcp://127.0.0.1:0",
                                 control_address="127.0.0.1:0", worker_address="tcp://127.0.0.1:0")).start()
    config = RayPoolConfig(address="local", worker=WorkerSettings(bundle=str(cloud_dir), threads=1),
                           namespace="hat-bench-recovery", prefill_workers=1, decode_workers=2, worker_cpus=0.5,
                           log_to_driver=False)
    pool = RayWorkerPool(config, router).start()
    try:
        def whole() -> bool:  # the three workers registered, each the process the pool knows
            names = sorted(w.name for w in router.table.serving())
            return names == ["decode-0", "decode-1", "prefill-0"] and all(
                router.table.by_name(n).identity == pool.statuses.get(n, {}).get("routing_id") for n in names)

        if wait(whole, args.start_timeout) is None:
            raise SystemExit(f"the Ray pool did not come up within {args.start_timeout:g} s")
        victim = pool.statuses["decode-1"]
        log(f"ray: SIGKILL decode-1 (pid {victim['pid']})")
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        dropped = wait(lambda: all(w.identity != victim["routing_id"] for w in router.table.serving()), args.watch)
        left = args.watch - (time.monotonic() - killed)
        restored = wait(lambda: whole() and pool.statuses["decode-1"]["pid"] != victim["pid"], max(0.0, left))
        return dropped, None if restored is None else time.monotonic() - killed
    finally:
        router.stop()
        pool.stop()


def without_supervisor(cloud_dir: Path, args) -> tuple[float | None, float | None, int]:
    """(dropped, restored, workers at the end) after SIGKILLing decode-1 of hand-started processes."""
    from hat.testbed.local_cloud import local_disaggregated_cloud

    def workers(url: str) -> int:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(float(re.search(r"^hat_router_workers (\S+)$", reply.read().decode(), re.M).group(1)))

    with local_disaggregated_cloud(cloud_dir, prefill=1, decode=2, threads=1) as cloud:
        if wait(lambda: workers(cloud.metrics_url) == 3, args.start_timeout) is None:
            raise SystemExit("the hand-started workers did not register")
        log(f"no supervisor: SIGKILL decode-1 (pid {cloud.worker_pids['decode-1']})")
        os.kill(cloud.worker_pids["decode-1"], signal.SIGKILL)
        killed = time.monotonic()
        dropped = wait(lambda: workers(cloud.metrics_url) == 2, args.watch)
        left = args.watch - (time.monotonic() - killed)
        restored = wait(lambda: workers(cloud.metrics_url) == 3, max(0.0, left))
        return dropped, None if restored is None else time.monotonic() - killed, workers(cloud.metrics_url)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
    from hat.common.split import split_checkpoint

    with tempfile.TemporaryDirectory(prefix="hat-bench-recovery-") as tmp:
        _, cloud_dir = split_checkpoint(args.model or reference_model_dir(), DEFAULT_INPUT_LAYERS,
                                        DEFAULT_OUTPUT_LAYERS, Path(tmp) / "bundle", "float32")
        ray_dropped, ray_restored = with_ray(cloud_dir, args)
        plain_dropped, plain_restored, plain_left = without_supervisor(cloud_dir, args)

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f} s"

    print("worker recovery: router + 1 prefill + 2 decode workers (reference model, float32, CPU, 1 thread each); "
          "decode-1 SIGKILLed")
    print(f"ray:           dead process dropped by the router at {seconds(ray_dropped)}; pool of 3 serving again "
          f"{seconds(ray_restored)} after the kill")
    restored = (f"pool of 3 serving again {seconds(plain_restored)} after the kill" if plain_restored is not None
                else f"pool still {plain_left} of 3 workers {args.watch:g} s after the kill")
    print(f"no supervisor: dead process dropped by the router at {seconds(plain_dropped)}; {restored}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
