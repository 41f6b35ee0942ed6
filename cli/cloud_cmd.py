"""`hat cloud serve --bundle BUNDLE/cloud [--role all|router|prefill|decode] ...`.

`all` (the default) is one process that serves devices itself. A disaggregated cloud is a `router`
(devices connect to its --data and --control addresses; workers to its --workers address) and any
number of `prefill` and `decode` workers, each started with --router pointing at the router's
--workers address; they may run on other hosts. With --ray-address, the router keeps its workers
alive on Ray itself (cli/ray_pool_args.py); `hat cloud scale` changes their numbers (cli/scale_cmd.py).
"""
from __future__ import annotations

import signal
import threading

from . import scale_cmd
from .generate_cmd import set_threads
from .ray_pool_args import add_pool_arguments

REGISTER_TIMEOUT_S = 60.0  # how long a worker waits for the router to accept it at start-up


def add_parser(commands) -> None:
    cloud = commands.add_parser("cloud", help="the cloud server")
    sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="ACTION")
    p = sub.add_parser("serve", help="serve the middle layers to devices")
    p.add_argument("--bundle", required=True, help="cloud bundle folder (BUNDLE/cloud from `hat split`)")
    p.add_argument("--role", choices=("all", "router", "prefill", "decode"), default="all",
                   help="all: one process; router: devices' entry point for prefill and decode workers "
                        "(default: %(default)s)")
    p.add_argument("--data", default="tcp://127.0.0.1:5555",
                   help="all/router: ZeroMQ data-plane bind address devices connect to (port 0 = any)")
    p.add_argument("--control", default="127.0.0.1:5556",
                   help="all/router: gRPC control-plane bind address HOST:PORT (port 0 = any)")
    p.add_argument("--workers", default="tcp://127.0.0.1:5557",
                   help="router: bind address prefill and decode workers connect to (port 0 = any)")
    p.add_argument("--router", default="", metavar="ADDRESS",
                   help="prefill/decode: the router's --workers address, e.g. tcp://10.0.0.2:5557")
    p.add_argument("--kv-address", default="tcp://127.0.0.1:0",
                   help="prefill/decode: bind address for KV handoffs from peers; bind a reachable interface "
                        "(or 0.0.0.0) when workers are on several hosts (default: %(default)s)")
    p.add_argument("--worker-id", default="", help="prefill/decode: this worker's name (default: role-host-pid)")
    p.add_argument("--disaggregation", choices=("auto", "always", "never"), default="auto",
                   help="router: when a session's decoding moves from its prefill worker to a decode worker: when its "
                        "TBT target would be missed (auto), at its first round (always), or never")
    p.add_argument("--device", default="cpu", help="torch device for the middle part (cpu, cuda, cuda:1)")
    p.add_argument("--pipeline-stages", type=int, default=1, metavar="N",
                   help="all: cut the middle layers over N processes (torch.distributed: gloo on CPU, NCCL on GPU; "
                        "with cuda, stage k runs on the k-th GPU after --device: NCCL needs one GPU per stage)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session is freed")
    p.add_argument("--max-sessions", type=int, default=1024, help="sessions held at once")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--kv-budget-gb", type=float, default=2.0,
                   help="KV memory all sessions may hold, GiB; new sessions wait beyond it (default: %(default)s)")
    p.add_argument("--metrics", default="", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--device-rate", type=float, default=2000.0, metavar="MSG_PER_S",
                   help="all/router: messages per second one device connection may send (beyond a burst of 500: "
                        "OVERLOADED); 0 = no limit (default: %(default)s)")
    p.add_argument("--device-sessions", type=int, default=64,
                   help="all/router: sessions one device id may hold open (default: %(default)s)")
    p.add_argument("--keys", default="", metavar="DIR",
                   help="encrypt and authenticate with the cloud identity in DIR (`hat keys generate`): all/router: "
                        "the devices' planes (CURVE, TLS; devices in DIR/allowed, `hat keys add`) and the workers' "
                        "link; prefill/decode: the same folder, for the links to the router and between workers. "
                        "Required on addresses other than loopback")
    p.add_argument("--insecure", action="store_true",
                   help="run unencrypted on addresses other machines reach (trusted networks only)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running sessions may take to finish before the server stops")
    add_pool_arguments(p)
    p.set_defaults(run=run_serve)
    scale_cmd.add_parser(sub)


def device_limits(args):
    from hat.cloud.device_limits import DeviceLimitsConfig

    return DeviceLimitsConfig(messages_per_s=args.device_rate, sessions_per_device=args.device_sessions)


def stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def run_serve(args) -> int:
    stop = threading.Event()
    stop_on_signals(stop)
    if args.ray_address and args.role != "router":
        raise SystemExit("hat cloud serve: error: --ray-address is the router's (--role router): it keeps the workers")
    if args.role == "router":
        return _serve_router(args, stop)
    from hat.cloud.config import CloudConfig
    from hat.cloud.server import CloudServer

    if args.role != "all" and not args.router:
        raise SystemExit(f"hat cloud serve: error: --role {args.role} needs --router (the router's --workers address)")
    set_threads(args.threads)
    try:
        config = CloudConfig(bundle=args.bundle, data_address=args.data, control_address=args.control, device=args.device,
                             session_idle_timeout_s=args.idle_timeout, max_sessions=args.max_sessions,
                             kv_budget_bytes=int(args.kv_budget_gb * (1 << 30)), metrics_address=args.metrics,
                             drain_timeout_s=args.drain_timeout, role=args.role, router_address=args.router,
                             kv_address=args.kv_address, worker_id=args.worker_id,
                             pipeline_stages=args.pipeline_stages, keys_dir=args.keys, insecure=args.insecure,
                             device_limits=device_limits(args))
    except ValueError as exc:
        raise SystemExit(f"hat cloud serve: error: {exc}") from None
    server = CloudServer(config).start()
    try:
        if args.role != "all":
            server.wait_registered(REGISTER_TIMEOUT_S)
        first, last = server.manifest.middle_layers
        # one line a supervisor (or `hat demo`) can wait for
        metrics = f" metrics=http://{server.metrics_address}/metrics" if server.metrics_address else ""
        if args.role == "all":
            secure = f" keys={server.security.identity.name}" if server.security else ""
            print(f"ready data={server.data_address} control={server.control_address} layers=[{first},{last})"
                  f"{metrics}{secure}", flush=True)
        else:
            print(f"ready role={args.role} worker={server.agent.worker_id} router={args.router} "
                  f"kv={server.kv_address} layers=[{first},{last}){metrics}", flush=True)
        while not stop.wait(0.5):
            if args.role != "all" and server.agent.accepted is False:  # superseded by a newer process under its id
                raise RuntimeError(f"the router refused this worker: {server.agent.refusal}")
    except RuntimeError as exc:
        raise SystemExit(f"hat cloud serve: error: {exc}") from None
    finally:
        server.stop(drain_s=config.drain_timeout_s if args.role == "all" else 0.0)
        print("stopped", flush=True)
    return 0


def _serve_router(args, stop: threading.Event) -> int:
    from hat.cloud.config import RouterConfig
    from hat.cloud.router import Router

    config = RouterConfig(bundle=args.bundle, data_address=args.data, control_address=args.control,
                          worker_address=args.workers, disaggregation=args.disaggregation,
                          session_idle_timeout_s=args.idle_timeout, metrics_address=args.metrics,
                          drain_timeout_s=args.drain_timeout, keys_dir=args.keys, insecure=args.insecure,
                          device_limits=device_limits(args))
    router = Router(config).start()
    pool = None
    try:
        if args.ray_address:
            from .ray_pool_args import start_pool

            pool = start_pool(args, router)
            stop_on_signals(stop)  # again: joining Ray put handlers of its own in place (SIGTERM would abort)
        metrics = f" metrics=http://{router.metrics_address}/metrics" if router.metrics_address else ""
        secure = f" keys={router.security.identity.name}" if router.security else ""
        ray = f" ray_namespace={args.ray_namespace}" if pool else ""
        print(f"ready data={router.data_address} control={router.control_address} workers={router.worker_address}"
              f"{metrics}{secure}{ray}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        router.stop(drain_s=config.drain_timeout_s)
        if pool is not None:  # after the router's drain: the workers serve its last sessions
            pool.stop()
        print("stopped", flush=True)
    return 0
