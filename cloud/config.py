"""Configuration of a cloud server."""
from __future__ import annotations

from dataclasses import dataclass

from .device_limits import DeviceLimitsConfig

WORKER_ROLES = ("all", "prefill", "decode")  # roles of a process that runs the middle part
MAX_WORKER_ID_BYTES = 200  # a worker's routing id is its id and a nonce, within ZeroMQ's 255 bytes


@dataclass(frozen=True, slots=True)
class CloudConfig:
    bundle: str  # path of the cloud bundle written by `hat split` (BUNDLE/cloud)
    data_address: str = "tcp://127.0.0.1:5555"  # ZeroMQ ROUTER bind address of the data plane (port 0 = any free)
    control_address: str = "127.0.0.1:5556"  # gRPC bind address of the control plane (port 0 = any free)
    device: str = "cpu"  # torch device the middle part runs on (cpu, cuda, cuda:1)
    session_idle_timeout_s: float = 300.0  # a session untouched this long is dropped and its cache freed
    max_sessions: int = 1024  # sessions held at once; an OPEN beyond this is refused with OVERLOADED
    max_tokens_per_message: int = 8192  # largest FORWARD accepted, in tokens
    max_batch_tokens: int = 8192  # tokens of all sessions run in one forward of the middle part
    poll_interval_s: float = 0.05  # longest wait for traffic before housekeeping (expiry) runs
    grpc_workers: int = 4  # threads serving the control plane
    kv_budget_bytes: int = 2 << 30  # middle-layer KV memory all sessions may hold; an OPEN beyond it waits (OVERLOADED)
    kv_block_tokens: int = 16  # positions per block of KV accounting
    overload_retry_ms: int = 250  # the retry hint sent with an OVERLOADED refusal
    drain_timeout_s: float = 30.0  # at shutdown, how long running sessions may take to finish
    default_ttft_slo_ms: int = 2000  # a request's time-to-first-token target when its OPEN names none
    default_tbt_slo_ms: int = 200  # a request's time-between-rounds target when its OPEN names none
    metrics_address: str = ""  # HOST:PORT of the Prometheus /metrics endpoint (port 0 = any free); empty = none
    profile_on_start: bool = True  # time a few forwards at start-up to seed the latency predictor devices plan with
    role: str = "all"  # "all": one process serves devices itself; "prefill" or "decode": a worker behind a router
    router_address: str = ""  # prefill/decode: the router's worker address (tcp://HOST:PORT) to connect and register to
    kv_address: str = "tcp://127.0.0.1:0"  # prefill/decode: bind address where peers push KV handoffs (port 0 = any)
    worker_id: str = ""  # prefill/decode: this worker's name at the router (empty = role-host-pid-random)
    pipeline_stages: int = 1  # processes the middle part's layers are cut over (torch.distributed; 1 = this one alone)
    heartbeat_interval_s: float = 0.25  # prefill/decode: how often the worker tells the router its load
    handoff_timeout_s: float = 10.0  # decode: longest wait for a handed-off session's KV before its FORWARDs fail
    keys_dir: str = ""  # `hat keys` folder: the cloud's identity and allowed/ devices; "" = unencrypted (loopback only)
    insecure: bool = False  # allow unencrypted planes on addresses other machines can reach (trusted networks only)
    device_limits: DeviceLimitsConfig = DeviceLimitsConfig()  # per-connection message rate, per-device sessions

    def __post_init__(self):
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {', '.join(WORKER_ROLES)}, got {self.role!r}")
        if self.role != "all" and not self.router_address:
            raise ValueError(f"a {self.role} worker needs the router's worker address (router_address)")
        if len(self.worker_id.encode()) > MAX_WORKER_ID_BYTES:
            raise ValueError(f"worker_id is {len(self.worker_id.encode())} bytes; at most {MAX_WORKER_ID_BYTES}")
        if self.pipeline_stages > 1 and self.role != "all":
            raise ValueError("a pipeline-parallel middle part serves as role all: its KV cache lives on several "
                             "processes and cannot be handed off")
        for name in ("pipeline_stages", "heartbeat_interval_s", "handoff_timeout_s", "session_idle_timeout_s", "max_sessions", "max_tokens_per_message", "max_batch_tokens",
                     "poll_interval_s", "grpc_workers", "kv_budget_bytes", "kv_block_tokens", "overload_retry_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


DISAGGREGATION_POLICIES = ("auto", "always", "never")  # when a session's decoding moves off its prefill worker


@dataclass(frozen=True, slots=True)
class RouterConfig:
    bundle: str  # the cloud bundle the workers serve (the router reads its manifest and model config, no weights)
    data_address: str = "tcp://127.0.0.1:5555"  # ZeroMQ ROUTER bind address devices connect to (port 0 = any free)
    control_address: str = "127.0.0.1:5556"  # gRPC bind address of the control plane devices register with
    worker_address: str = "tcp://127.0.0.1:5557"  # ZeroMQ ROUTER bind address prefill and decode workers connect to
    # "auto": a session decodes on its prefill worker until the latency predictor says a round there would miss its
    # TBT target, then moves to a decode worker; "always": moves at its first decode round; "never": stays
    disaggregation: str = "auto"
    worker_timeout_s: float = 3.0  # a worker silent this long is taken for dead; its sessions' devices re-send history
    rebalance_margin: int = 2  # move a decode session when decode workers' session counts differ by this much
    rebalance_interval_s: float = 1.0  # how often decode workers' loads are compared
    move_cooldown_s: float = 5.0  # a session that moved is not moved again for this long (no ping-pong)
    max_tokens_per_message: int = 8192  # largest FORWARD accepted, in tokens (told to devices at registration)
    session_idle_timeout_s: float = 300.0  # a session untouched this long is forgotten (workers free its cache)
    default_ttft_slo_ms: int = 2000  # a request's time-to-first-token target when its OPEN names none
    default_tbt_slo_ms: int = 200  # a request's time-between-rounds target when its OPEN names none
    overload_retry_ms: int = 250  # the retry hint sent when no worker can take a new session
    metrics_address: str = ""  # HOST:PORT of the Prometheus /metrics endpoint (port 0 = any free); empty = none
    poll_interval_s: float = 0.05  # longest wait for traffic before liveness and rebalancing checks run
    grpc_workers: int = 4  # threads serving the control plane
    drain_timeout_s: float = 30.0  # at shutdown, how long running sessions may take to finish
    keys_dir: str = ""  # `hat keys` folder: the cloud's identity and allowed/ devices; "" = unencrypted (loopback only)
    insecure: bool = False  # allow unencrypted planes on addresses other machines can reach (trusted networks only)
    device_limits: DeviceLimitsConfig = DeviceLimitsConfig()  # per-connection message rate, per-device sessions

    def __post_init__(self):
        if self.disaggregation not in DISAGGREGATION_POLICIES:
            raise ValueError(f"disaggregation must be one of {', '.join(DISAGGREGATION_POLICIES)}, "
                             f"got {self.disaggregation!r}")
        for name in ("worker_timeout_s", "rebalance_margin", "rebalance_interval_s", "max_tokens_per_message",
                     "session_idle_timeout_s", "overload_retry_ms", "poll_interval_s", "grpc_workers"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
