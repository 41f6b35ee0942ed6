"""`hat cloud serve --bundle BUNDLE/cloud --data tcp://HOST:PORT --control HOST:PORT`."""
from __future__ import annotations

import signal
import threading

from .generate_cmd import set_threads


def add_parser(commands) -> None:
    cloud = commands.add_parser("cloud", help="the cloud server")
    sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="ACTION")
    p = sub.add_parser("serve", help="serve the middle layers to devices")
    p.add_argument("--bundle", required=True, help="cloud bundle folder (BUNDLE/cloud from `hat split`)")
    p.add_argument("--data", default="tcp://127.0.0.1:5555", help="ZeroMQ data-plane bind address (port 0 = any)")
    p.add_argument("--control", default="127.0.0.1:5556", help="gRPC control-plane bind address HOST:PORT (port 0 = any)")
    p.add_argument("--device", default="cpu", help="torch device for the middle part (cpu, cuda, cuda:1)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session is freed")
    p.add_argument("--max-sessions", type=int, default=1024, help="sessions held at once")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--kv-budget-gb", type=float, default=2.0,
                   help="KV memory all sessions may hold, GiB; new sessions wait beyond it (default: %(default)s)")
    p.add_argument("--metrics", default="", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running sessions may take to finish before the server stops")
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from hat.cloud.config import CloudConfig
    from hat.cloud.server import CloudServer

    set_threads(args.threads)
    config = CloudConfig(bundle=args.bundle, data_address=args.data, control_address=args.control, device=args.device,
                         session_idle_timeout_s=args.idle_timeout, max_sessions=args.max_sessions,
                         kv_budget_bytes=int(args.kv_budget_gb * (1 << 30)), metrics_address=args.metrics,
                         drain_timeout_s=args.drain_timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = CloudServer(config).start()
    first, last = server.manifest.middle_layers
    # one line a supervisor (or `hat demo`) can wait for
    metrics = f" metrics=http://{server.metrics_address}/metrics" if server.metrics_address else ""
    print(f"ready data={server.data_address} control={server.control_address} layers=[{first},{last}){metrics}",
          flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(drain_s=config.drain_timeout_s)
        print("stopped", flush=True)
    return 0
