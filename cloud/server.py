"""The cloud server: loads the middle part, binds the data plane (ZeroMQ) and control plane (gRPC).

With role "prefill" or "decode" it is a worker behind a router (`hat.cloud.router`): its data plane
connects to the router instead of binding, it binds a KV socket for handoffs, and the router's control
plane serves the devices."""
from __future__ import annotations

import logging
import threading
import time

import grpc
import torch
import zmq

from hat.common.metrics_endpoint import MetricsServer

from .config import CloudConfig
from .control_service import ControlService
from .data_server import DataServer
from .device_limits import max_frame_bytes
from .device_registry import DeviceRegistry
from .kv_budget import KVBudget
from .latency_model import CloudLatencyModel
from .metrics import CloudMetrics
from .middle_worker import MiddleWorker, load_middle_part
from .pipeline_stages import PipelineConfig, load_pipelined_middle_part
from .security import CloudSecurity, cluster_security, device_plane_security, start_control_plane
from .session_store import SessionStore
from .stats import CloudStats
from .worker_agent import WorkerAgent, advertised

log = logging.getLogger("hat.cloud")


class CloudServer:
    """Use as a context manager, or start() / stop(). `data_address` and `control_address` give the
    bound addresses (useful with port 0)."""

    def __init__(self, config: CloudConfig):
        self.config = config
        if config.pipeline_stages > 1:
            part, self.manifest = load_pipelined_middle_part(config.bundle, config.device, config.pipeline_stages,
                                                             PipelineConfig(threads=torch.get_num_threads()))
        else:
            part, self.manifest = load_middle_part(config.bundle, config.device)
        self.part = part
        self.stats = CloudStats()
        self.budget = KVBudget(part.kv_bytes_per_position, config.kv_budget_bytes, config.kv_block_tokens,
                               config.overload_retry_ms)
        self.store = SessionStore(part, config.max_sessions, config.session_idle_timeout_s, self.budget)
        self.registry = DeviceRegistry(self.manifest)
        self.worker = MiddleWorker(part)
        self.latency = CloudLatencyModel()
        self.latency.stages = getattr(part, "stages", 1)
        if config.profile_on_start:
            self.latency.profile(part)
        self.control = ControlService(config, self.manifest, part.spec.max_context, self.registry, self.store,
                                      self.stats, self.latency)
        self.metrics = CloudMetrics()
        self._metrics_server: MetricsServer | None = None
        self._data: DataServer | None = None
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._grpc: grpc.Server | None = None
        self.security: CloudSecurity | None = None  # with keys: CURVE and TLS of the devices' planes (role all), or
        # CURVE of a worker's links to its router and peers (prefill, decode)
        self.data_address = self.control_address = self.metrics_address = self.kv_address = ""
        self.agent: WorkerAgent | None = None  # set for a prefill or decode worker

    def start(self) -> "CloudServer":
        if self.config.role == "all":
            data = self._start_standalone()
        else:
            data = self._start_worker()
        self._data = data
        self.control.pending_work = data.pending_work
        self._register_metrics(data)
        if self.config.metrics_address:
            self._metrics_server = MetricsServer(self.metrics.registry, self.config.metrics_address).start()
            self.metrics_address = self._metrics_server.address
        self._thread = threading.Thread(target=self._serve, args=(data,), name="hat-data-plane", daemon=True)
        self._thread.start()
        m = self.manifest
        log.info("serving layers [%d, %d) of %s (%s) as %s on data %s, control %s", *m.middle_layers, m.source_name,
                 m.dtype, self.config.role, self.data_address, self.control_address or "(the router's)")
        return self

    def _start_standalone(self) -> DataServer:
        """Bind the data plane's ROUTER and the gRPC control plane: devices talk to this process."""
        c = self.config
        self.security = device_plane_security(c.keys_dir, c.insecure, [c.data_address, c.control_address], self._context)
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(c.max_tokens_per_message, self.part.spec.hidden_size))
        if self.security is not None:
            self.security.protect(socket)
        socket.bind(c.data_address)
        self.data_address = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._grpc, self.control_address = start_control_plane(self.control, c.control_address, c.grpc_workers,
                                                               self.security)
        data = DataServer(c, socket, self.store, self.registry, self.worker, self.stats, self.latency, self.metrics)
        data.security = self.security
        return data

    def _start_worker(self) -> DataServer:
        """Bind the KV socket, connect to the router as a prefill or decode worker (it registers on its own)."""
        c = self.config
        self.security = cluster_security(c.keys_dir, c.insecure, [c.router_address, c.kv_address], self._context)
        kv_socket = self._context.socket(zmq.PULL)
        kv_socket.setsockopt(zmq.LINGER, 0)
        if self.security is not None:
            self.security.protect_cluster_server(kv_socket)
        kv_socket.bind(c.kv_address)
        self.kv_address = advertised(kv_socket.getsockopt_string(zmq.LAST_ENDPOINT))
        self.agent = WorkerAgent(c, self.manifest, self.store, self.latency, self.kv_address, self._context,
                                 self.security.protect_cluster_client if self.security is not None else None)
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.agent.routing_id)
        if self.security is not None:
            self.security.protect_cluster_client(socket)
        socket.connect(c.router_address)
        self.data_address = self.config.router_address
        return DataServer(self.config, socket, self.store, None, self.worker, self.stats, self.latency, self.metrics,
                          self.agent, kv_socket)

    def wait_registered(self, timeout_s: float) -> None:
        """Block until the router accepts this worker; RuntimeError if it refuses or does not answer in time."""
        deadline = time.monotonic() + timeout_s
        while self.agent.accepted is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.agent.accepted is None:
            raise RuntimeError(f"no answer from the router at {self.config.router_address} within {timeout_s:g} s")
        if not self.agent.accepted:
            raise RuntimeError(f"the router refused this worker: {self.agent.refusal}")

    def _serve(self, data: DataServer) -> None:
        try:
            data.serve(self._stop)
        finally:
            data.socket.close(linger=0)
            if data.kv_socket is not None:
                data.kv_socket.close(linger=0)

    def _register_metrics(self, data: DataServer) -> None:
        m, budget, stats = self.metrics, self.budget, self.stats
        m.families.append(self.registry.telemetry_families)
        m.gauges.update({
            "hat_sessions": ("sessions held", lambda: len(self.store)),
            "hat_pending_forwards": ("FORWARDs waiting for a batch", lambda: len(data._pending)),
            "hat_kv_blocks_used": ("KV blocks reserved by sessions", lambda: budget.used_blocks),
            "hat_kv_blocks_total": ("KV blocks in the budget", lambda: budget.total_blocks),
            "hat_kv_block_bytes": ("bytes of one KV block", lambda: budget.block_bytes),
            "hat_draining": ("1 while shutting down (no new sessions)", lambda: float(data.draining)),
        })
        m.counters.update({
            "hat_forward_batches_total": ("forwards of the middle part", lambda: stats.forward_batches),
            "hat_admission_refusals_total": ("OPENs refused for want of KV memory", lambda: budget.refusals),
            "hat_expired_sessions_total": ("sessions freed after idling", lambda: self.store.expired_total),
        })

    def drain(self, timeout_s: float) -> bool:
        """Refuse new sessions and wait up to `timeout_s` for the running ones to close; True if they all did."""
        self.control.draining = True
        if self._data is not None:
            self._data.draining = True
        deadline = time.monotonic() + timeout_s
        while len(self.store) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not len(self.store)

    def stop(self, grace_s: float = 2.0, drain_s: float = 0.0) -> None:
        """Stop taking work (after draining running sessions for up to `drain_s`), finish the turn in progress,
        release both planes."""
        if drain_s > 0 and not self.drain(drain_s):
            log.warning("stopping with %d sessions still open after draining for %.0f s", len(self.store), drain_s)
        self.control.draining = True
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 5)
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait()
        if hasattr(self.part, "close"):  # the stage processes of a pipeline-parallel middle part
            self.part.close()
        if self.security is not None:
            self.security.stop()
        self._context.term()

    def __enter__(self) -> "CloudServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
