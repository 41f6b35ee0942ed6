"""Configuration of a router's Ray pool of workers (`hat cloud serve --role router --ray-address ...`)."""
from __future__ import annotations

from dataclasses import dataclass

POOL_ROLES = ("prefill", "decode")  # the workers a pool keeps
MAX_POOL_WORKERS = 256  # most workers of one role a pool keeps (a bound on what one Scale request can ask for)
POOL_RESOURCE = "hat_{role}"  # with pool_resources, each worker needs one unit of this custom resource (hat_decode)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What every worker of the pool runs with (the prefill/decode fields of CloudConfig); sent with each `serve`
    call, so a router restarted with other settings restarts its workers' servers with them."""
    bundle: str  # the cloud bundle folder, at the same path on every host of the cluster
    device: str = "cpu"  # torch device of the middle part ("cuda" on a worker given GPUs: Ray sets which it sees)
    threads: int = 1  # torch CPU threads, set explicitly (Ray sets OMP_NUM_THREADS=1 where an actor reserves no CPU)
    kv_host: str = ""  # host the worker's KV socket binds; "" = the address of the Ray node it runs on
    kv_budget_bytes: int = 2 << 30  # middle-layer KV memory its sessions may hold
    max_sessions: int = 1024  # sessions it holds at once
    session_idle_timeout_s: float = 300.0  # an idle session is freed after this long
    keys_dir: str = ""  # the cloud's `hat keys` folder (same path on every host): CURVE on its links; "" = none
    insecure: bool = False  # allow unencrypted links on addresses other machines reach (trusted networks only)
    profile_on_start: bool = True  # time a few forwards at start-up to seed its latency predictor
    heartbeat_interval_s: float = 0.25  # how often it tells the router its load
    register_timeout_s: float = 60.0  # longest wait for the router to accept it before `serve` fails (retried)


@dataclass(frozen=True, slots=True)
class RayPoolConfig:
    address: str  # "local": a Ray cluster of this process's own (it ends with the router); else the cluster's HOST:PORT
    worker: WorkerSettings  # what each worker runs with
    namespace: str = "hatserve"  # Ray namespace of the workers' actor names (one per router sharing a cluster)
    prefill_workers: int = 1  # prefill workers kept alive
    decode_workers: int = 1  # decode workers kept alive
    worker_cpus: float = 1.0  # CPUs Ray reserves per worker (fractions allowed)
    worker_gpus: float = 0.0  # GPUs Ray reserves per worker (fractions allowed)
    pool_resources: bool = False  # each worker also needs one unit of the custom resource hat_prefill or hat_decode
    max_restarts: int = -1  # times Ray restarts a dead worker actor (-1 = without limit)
    auth_token_path: str = ""  # Ray's token file (RAY_AUTH_TOKEN_PATH); "" with "local" = a fresh one of its own
    auth_disabled: bool = False  # a cluster started with RAY_AUTH_MODE=disabled (trusted private networks only)
    log_to_driver: bool = True  # print the workers' output in the router's
    reconcile_interval_s: float = 0.5  # how often the pool checks each worker is there and serving
    drain_timeout_s: float = 30.0  # scale-down: longest wait for a worker's sessions to move off before it stops
    stop_timeout_s: float = 10.0  # scale-down: longest wait for a drained worker to stop before it is killed
    placement_warning_s: float = 60.0  # a worker not serving after this long is reported (no room in the cluster?)

    def __post_init__(self):
        if not self.address:
            raise ValueError("a Ray pool needs a cluster address (HOST:PORT) or \"local\"")
        for name in ("prefill_workers", "decode_workers", "worker_cpus", "worker_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("prefill_workers", "decode_workers"):
            if getattr(self, name) > MAX_POOL_WORKERS:
                raise ValueError(f"{name} is at most {MAX_POOL_WORKERS}, got {getattr(self, name)}")
        for name in ("reconcile_interval_s", "drain_timeout_s", "stop_timeout_s", "placement_warning_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.address != "local" and not (self.auth_token_path or self.auth_disabled):
            raise ValueError("a Ray cluster's token file is needed to join it (the RAY_AUTH_TOKEN_PATH its nodes were "
                             "started with), or say it runs without token auth (RAY_AUTH_MODE=disabled)")
        if self.worker.threads < 1:
            raise ValueError(f"a worker's threads must be at least 1, got {self.worker.threads}")
