"""The cloud server: loads the middle part, binds the data plane (ZeroMQ) and control plane (gRPC)."""
from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import zmq

from hat.common.proto import hat_pb2_grpc

from .config import CloudConfig
from .control_service import ControlService
from .data_server import DataServer
from .device_registry import DeviceRegistry
from .kv_budget import KVBudget
from .latency_model import CloudLatencyModel
from .middle_worker import MiddleWorker, load_middle_part
from .session_store import SessionStore
from .stats import CloudStats

log = logging.getLogger("hat.cloud")


class CloudServer:
    """Use as a context manager, or start() / stop(). `data_address` and `control_address` give the
    bound addresses (useful with port 0)."""

    def __init__(self, config: CloudConfig):
        self.config = config
        part, self.manifest = load_middle_part(config.bundle, config.device)
        self.stats = CloudStats()
        self.budget = KVBudget(part.kv_bytes_per_position, config.kv_budget_bytes, config.kv_block_tokens,
                               config.overload_retry_ms)
        self.store = SessionStore(part, config.max_sessions, config.session_idle_timeout_s, self.budget)
        self.registry = DeviceRegistry(self.manifest)
        self.worker = MiddleWorker(part)
        self.latency = CloudLatencyModel()
        if config.profile_on_start:
            self.latency.profile(part)
        self.control = ControlService(config, self.manifest, part.spec.max_context, self.registry, self.store,
                                      self.stats, self.latency)
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._grpc: grpc.Server | None = None
        self.data_address = self.control_address = ""

    def start(self) -> "CloudServer":
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.config.data_address)
        self.data_address = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.config.grpc_workers))
        hat_pb2_grpc.add_HatControlServicer_to_server(self.control, self._grpc)
        port = self._grpc.add_insecure_port(self.config.control_address)
        if port == 0:
            raise OSError(f"cannot bind the control plane to {self.config.control_address}")
        self.control_address = f"{self.config.control_address.rsplit(':', 1)[0]}:{port}"
        self._grpc.start()
        data = DataServer(self.config, socket, self.store, self.registry, self.worker, self.stats, self.latency)
        self.control.pending_work = data.pending_work
        self._thread = threading.Thread(target=self._serve, args=(data, socket), name="hat-data-plane", daemon=True)
        self._thread.start()
        m = self.manifest
        log.info("serving layers [%d, %d) of %s (%s) on data %s, control %s", *m.middle_layers, m.source_name, m.dtype,
                 self.data_address, self.control_address)
        return self

    def _serve(self, data: DataServer, socket: zmq.Socket) -> None:
        try:
            data.serve(self._stop)
        finally:
            socket.close(linger=0)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop taking work, finish the turn in progress, release both planes."""
        self.control.draining = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 5)
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait()
        self._context.term()

    def __enter__(self) -> "CloudServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
