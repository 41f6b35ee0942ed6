"""The router's Ray pool on the command line: `hat cloud serve --role router --ray-address ADDRESS|local
--prefill-workers N --decode-workers M ...` keeps that many workers alive as Ray actors (cloud/ray_pool.py);
`hat cloud scale` changes the numbers."""
from __future__ import annotations


def add_pool_arguments(p) -> None:
    g = p.add_argument_group("router: workers kept by Ray (pip install \"hatserve[ray]\")")
    g.add_argument("--ray-address", default="", metavar="ADDRESS|local",
                   help="keep the prefill and decode workers alive as Ray actors: join the Ray cluster at ADDRESS "
                        "(HOST:PORT of `ray start --head`), or start one of this process's own (local)")
    g.add_argument("--prefill-workers", type=int, default=1, metavar="N", help="prefill workers to keep (default: 1)")
    g.add_argument("--decode-workers", type=int, default=1, metavar="M", help="decode workers to keep (default: 1)")
    g.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs Ray reserves per worker (default: 1)")
    g.add_argument("--worker-gpus", type=float, default=0.0,
                   help="GPUs Ray reserves per worker (default: 0); with GPUs the workers run on cuda")
    g.add_argument("--pool-resources", action="store_true",
                   help="each worker also needs one unit of the custom resource hat_prefill or hat_decode: declare "
                        "them on the hosts meant for each pool (`ray start --resources '{\"hat_decode\": 4}'`)")
    g.add_argument("--max-restarts", type=int, default=-1, help="times Ray restarts a dead worker (-1 = no limit)")
    g.add_argument("--ray-namespace", default="hatserve",
                   help="Ray namespace of the workers' names; one per router sharing a cluster (default: hatserve)")
    g.add_argument("--ray-token", default="", metavar="PATH",
                   help="the token file the cluster's nodes were started with (RAY_AUTH_MODE=token "
                        "RAY_AUTH_TOKEN_PATH=PATH ray start ...); local: a fresh one unless given")
    g.add_argument("--ray-no-auth", action="store_true",
                   help="the cluster runs without token auth (RAY_AUTH_MODE=disabled; trusted private networks only)")


def start_pool(args, router):
    """The Ray pool for `router` from the parsed flags, started and attached to its control plane (Scale)."""
    from hat.cloud.ray_config import RayPoolConfig, WorkerSettings
    from hat.cloud.ray_pool import RayWorkerPool

    device = "cuda" if args.worker_gpus > 0 and args.device == "cpu" else args.device
    settings = WorkerSettings(bundle=args.bundle, device=device, threads=args.threads or max(1, int(args.worker_cpus)),
                              kv_budget_bytes=int(args.kv_budget_gb * (1 << 30)), max_sessions=args.max_sessions,
                              session_idle_timeout_s=args.idle_timeout, keys_dir=args.keys, insecure=args.insecure)
    config = RayPoolConfig(address=args.ray_address, worker=settings, namespace=args.ray_namespace,
                           prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                           worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus,
                           pool_resources=args.pool_resources, max_restarts=args.max_restarts,
                           auth_token_path=args.ray_token, auth_disabled=args.ray_no_auth,
                           drain_timeout_s=args.drain_timeout)
    pool = RayWorkerPool(config, router).start()
    router.control.pool = pool
    return pool
