"""Configuration of a cloud server."""
from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self):
        for name in ("session_idle_timeout_s", "max_sessions", "max_tokens_per_message", "max_batch_tokens",
                     "poll_interval_s", "grpc_workers", "kv_budget_bytes", "kv_block_tokens", "overload_retry_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
