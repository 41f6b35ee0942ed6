"""The router of a disaggregated cloud (`hat cloud serve --role router`).

Devices talk to it exactly as to a single-process cloud (same data and control planes). Prefill and
decode workers, on this host or others, connect to its worker socket and register in their first
heartbeat. The router runs no model: one thread forwards each device message (zero-copy) to the
worker holding the session and each reply back, counting every request in flight per worker and per
session. It places new sessions, orders KV handoffs and rebalancing moves (`router_policy`), and when
a worker falls silent it answers that worker's requests in flight with UNKNOWN_SESSION and forgets its
sessions, so their devices re-open and re-send their history to live workers.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import grpc
import zmq

from hat.common import wire
from hat.common.bundle import load_manifest
from hat.common.cost_fit import attended
from hat.common.metrics_endpoint import MetricsServer
from hat.common.model_spec import load_model_spec
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError, WireLimits

from .cluster_protocol import ClusterError, cluster_header, decode_cluster_header, encode_cluster
from .config import RouterConfig
from .device_limits import DeviceLimits, max_frame_bytes
from .device_registry import DeviceRegistry
from .metrics import CloudMetrics
from .router_control import RouterControl
from .router_policy import RoutedSession, WorkerInfo, WorkerTable
from .worker_drain import WorkerDrain
from .worker_fence import WorkerFence
from .security import CloudSecurity, device_plane_security, start_control_plane

log = logging.getLogger("hat.cloud")


@dataclass(slots=True)
class InFlight:
    header: pb.DataHeader  # the request (to answer with an error if its worker dies)
    worker: bytes  # where it went
    tokens: int  # its new positions
    attended: float  # their query-key pairs


@dataclass(slots=True)
class RouterCounters:
    handoffs: int = 0  # KV handoffs completed
    handoff_failures: int = 0  # handoffs a target could not complete
    handoff_bytes: int = 0  # KV bytes moved
    handoff_positions: int = 0  # positions moved
    handoff_seconds: float = 0.0  # total time from the order to the target's ADOPTED
    rebalance_moves: int = 0  # decode sessions moved between decode workers
    workers_lost: int = 0  # workers taken for dead (or superseded by a new process under their id)
    workers_retired: int = 0  # workers dropped after draining (scaled down)
    errors: int = 0  # ERROR replies the router itself sent


class Router:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.manifest = load_manifest(config.bundle, part="cloud")
        spec = load_model_spec(config.bundle)
        self.limits = WireLimits(max_tensor_bytes=config.max_tokens_per_message * spec.hidden_size * 4)
        self.hidden_size = spec.hidden_size
        self.device_limits = DeviceLimits(config.device_limits, config.overload_retry_ms)
        self.registry = DeviceRegistry(self.manifest)
        self.table = WorkerTable(config.disaggregation, config.worker_timeout_s, config.rebalance_margin,
                                 config.move_cooldown_s)
        self.counters = RouterCounters()
        self.control = RouterControl(config, self.manifest, spec.max_context, self.registry, self.table)
        self.control.errors = lambda: self.counters.errors
        self.metrics = CloudMetrics()
        self._register_metrics()
        self._inflight: dict[tuple[bytes, int], InFlight] = {}
        self._handoff_ids = itertools.count(1)
        self._fence = WorkerFence(config.worker_timeout_s)  # connections taken for dead, or superseded by a restart
        self.drain = WorkerDrain()  # workers being retired (the Ray pool's scale-down asks, from its own thread)
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._grpc: grpc.Server | None = None
        self.security: CloudSecurity | None = None  # CURVE and TLS of the devices' planes (with keys)
        self._metrics_server: MetricsServer | None = None
        self.draining = False
        self.data_address = self.control_address = self.worker_address = self.metrics_address = ""

    def start(self) -> "Router":
        c = self.config
        self.security = device_plane_security(c.keys_dir, c.insecure, [c.data_address, c.control_address,
                                                                        c.worker_address], self._context)
        self._devices = self._bind(zmq.ROUTER, c.data_address, self.security,
                                   max_frame_bytes(c.max_tokens_per_message, self.hidden_size))
        self._workers = self._bind(zmq.ROUTER, c.worker_address)
        self._workers.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone worker raises instead of vanishing
        self.data_address = self._devices.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_address = self._workers.getsockopt_string(zmq.LAST_ENDPOINT)
        self._grpc, self.control_address = start_control_plane(self.control, c.control_address, c.grpc_workers,
                                                               self.security)
        if c.metrics_address:
            self._metrics_server = MetricsServer(self.metrics.registry, c.metrics_address).start()
            self.metrics_address = self._metrics_server.address
        self._thread = threading.Thread(target=self._loop, name="hat-router", daemon=True)
        self._thread.start()
        log.info("routing for layers [%d, %d) of %s on data %s, control %s, workers %s",
                 *self.manifest.middle_layers, self.manifest.source_name, self.data_address, self.control_address,
                 self.worker_address)
        return self

    def _bind(self, kind: int, address: str, devices: CloudSecurity | None = None, max_frame: int = -1) -> zmq.Socket:
        """A socket for devices (protected by `devices`: the devices' allow-list) or, without, for the workers
        (protected, when the cloud has keys, to admit the cloud's own key only)."""
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, max_frame)
        if devices is not None:
            devices.protect(socket)
        elif self.security is not None:
            self.security.protect_cluster_server(socket)
        socket.bind(address)
        return socket

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._devices, zmq.POLLIN)
        poller.register(self._workers, zmq.POLLIN)
        last_check = time.monotonic()
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(self.config.poll_interval_s * 1000))
                if self._workers in ready:  # replies first: they free capacity the next placements see
                    while self._workers.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self._from_worker(self._workers.recv_multipart(copy=False))
                if self._devices in ready:
                    while self._devices.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self._from_device(self._devices.recv_multipart(copy=False))
                if time.monotonic() - last_check > min(self.config.rebalance_interval_s, self.config.worker_timeout_s / 4):
                    last_check = time.monotonic()
                    self._housekeeping()
        finally:
            self._devices.close(linger=0)
            self._workers.close(linger=0)

    # devices -> workers

    def _from_device(self, frames: list) -> None:
        owner, header = frames[0].bytes, None
        try:
            self.device_limits.check_rate(owner)
            message = wire.decode(frames[1:], self.limits)
            header = message.header
            if self.security is not None:
                self.security.authorize(frames[1], header.device_id if header.kind == pb.OPEN else None)
            if header.kind == pb.OPEN:
                self._open(owner, header, frames)
            elif header.kind in (pb.FORWARD, pb.CLOSE):
                session = self.table.sessions.get(header.session_id)
                if session is None or session.meta.owner != owner or session.worker not in self.table.workers:
                    raise WireError(pb.UNKNOWN_SESSION, f"unknown session {header.session_id!r} (never opened, closed, "
                                                        "expired, or its worker failed)")
                session.last_active = time.monotonic()
                if header.kind == pb.FORWARD:
                    self._maybe_move(session, header)
                self._send_to_worker(session.worker, owner, header, frames, session)
            else:
                raise WireError(pb.MALFORMED, f"the cloud does not accept {pb.MessageKind.Name(header.kind)} messages")
        except WireError as exc:
            self._reply_error(owner, header or exc.header, exc)

    def _open(self, owner: bytes, header: pb.DataHeader, frames: list) -> None:
        c = self.config
        if not self.registry.is_registered(header.device_id):
            raise WireError(pb.NOT_REGISTERED, f"device {header.device_id!r} has not registered with the control plane")
        if self.draining:
            raise WireError(pb.OVERLOADED, "the cloud is shutting down and takes no new sessions")
        existing = self.table.sessions.get(header.session_id)
        if existing is not None and existing.meta.owner != owner:
            raise WireError(pb.SESSION_EXISTS, f"session {header.session_id!r} belongs to another connection")
        if existing is None:
            held = sum(1 for s in self.table.sessions.values() if s.meta.device_id == header.device_id)
            self.device_limits.check_sessions(header.device_id, held)
        positions = header.max_positions or self.control.max_context
        worker = self.table.pick_prefill(positions)
        if worker is None:
            raise WireError(pb.OVERLOADED, "no worker has KV room for the session now" if self.table.workers else
                            "no prefill or decode worker is registered", retry_after_ms=c.overload_retry_ms)
        if existing is not None:  # a re-open (the device recovering): the old copy goes wherever it was
            self._drop_session(existing)
        meta = pb.SessionMeta(session_id=header.session_id, device_id=header.device_id, owner=owner,
                              max_positions=positions, ttft_slo_ms=header.ttft_slo_ms or c.default_ttft_slo_ms,
                              tbt_slo_ms=header.tbt_slo_ms or c.default_tbt_slo_ms)
        session = RoutedSession(meta, worker.identity, time.monotonic())
        self.table.sessions[header.session_id] = session
        self.table.assign(session, worker)
        self._send_to_worker(worker.identity, owner, header, frames, session)

    def _maybe_move(self, session: RoutedSession, header: pb.DataHeader) -> None:
        """Before a FORWARD: to a decode worker (at a decode round the policy moves), or off a draining worker (at any
        idle moment)."""
        target = None
        if not header.append_only and self.table.should_move_to_decode(session, header.num_tokens, int(header.start)):
            target = self.table.pick_decode(session.meta.max_positions)
        target = target or self.table.drain_target(session)
        if target is not None:
            self._hand_off(session, target)

    def _hand_off(self, session: RoutedSession, target: WorkerInfo) -> None:
        """ADOPT to the target first (it then holds the session's FORWARDs), then HANDOFF to the source."""
        source = session.worker
        meta, handoff_id = session.meta, next(self._handoff_ids)
        self._send_cluster(target.identity, cluster_header(pb.ADOPT, session=meta, handoff_id=handoff_id))
        self._send_cluster(source, cluster_header(pb.HANDOFF, session=meta, kv_address=target.kv_address,
                                                  handoff_id=handoff_id))
        self.table.assign(session, target)
        session.handoff_began = session.moved_s = time.monotonic()
        session.moved_from = source
        log.info("session %s moves to %s", meta.session_id, target.name,
                 extra={"session": meta.session_id, "event": "handoff"})

    def _send_to_worker(self, worker: bytes, owner: bytes, header: pb.DataHeader, frames: list,
                        session: RoutedSession) -> None:
        tokens = header.num_tokens if header.kind == pb.FORWARD else 0
        pairs = attended(tokens, int(header.start)) if tokens else 0.0
        try:
            self._workers.send_multipart([worker, owner, *frames[1:]], copy=False)
        except zmq.ZMQError:
            self._lose_worker(worker, "its connection is gone")
            raise WireError(pb.UNKNOWN_SESSION, "the worker holding the session failed; re-send the history") from None
        self._inflight[(owner, header.sequence)] = InFlight(header, worker, tokens, pairs)
        info = self.table.workers[worker]
        info.inflight_tokens += tokens
        info.inflight_attended += pairs
        info.inflight_requests += 1
        session.inflight += 1

    # workers -> devices

    def _from_worker(self, frames: list) -> None:
        identity = frames[0].bytes
        if len(frames) >= 2 and not frames[1].bytes:
            try:
                if len(frames) != 3:
                    raise ClusterError(f"a cluster message is 2 frames, got {len(frames) - 1}")
                self._on_cluster(identity, decode_cluster_header(frames[2]))
            except ClusterError as exc:
                log.warning("dropped a message from worker %r: %s", identity, exc, extra={"event": "cluster_error"})
            return
        worker = self.table.workers.get(identity)
        if worker is None or len(frames) < 3:
            return  # a worker taken for dead answering late: its sessions' devices were told already
        worker.last_seen = time.monotonic()
        owner = frames[1].bytes
        try:
            header = pb.DataHeader.FromString(frames[2].bytes)
        except Exception:  # a worker's reply is trusted; one that does not parse is dropped, the device times out
            log.warning("undecodable reply from worker %s", worker.name, extra={"event": "cluster_error"})
            return
        flight = self._inflight.pop((owner, header.sequence), None)
        if flight is not None:
            worker.inflight_tokens -= flight.tokens
            worker.inflight_attended -= flight.attended
            worker.inflight_requests -= 1
            session = self.table.sessions.get(flight.header.session_id)
            if session is not None:
                session.inflight -= 1
                refused = header.kind == pb.ERROR and flight.header.kind == pb.OPEN
                if header.kind == pb.CLOSED or refused:  # gone, or never opened (the worker was full)
                    self.table.forget(flight.header.session_id)
        self._devices.send_multipart(frames[1:], copy=False)

    def _on_cluster(self, identity: bytes, header: pb.ClusterHeader) -> None:
        if header.kind in (pb.WORKER_REGISTER, pb.HEARTBEAT):
            self._on_heartbeat(identity, header)
        elif header.kind == pb.ADOPTED:
            self._on_adopted(identity, header)
        else:
            raise ClusterError(f"the router does not take {pb.ClusterKind.Name(header.kind)} from a worker")

    def _on_heartbeat(self, identity: bytes, header: pb.ClusterHeader) -> None:
        worker = self.table.workers.get(identity)
        if worker is None:
            fenced = self._fence.check(identity)
            if fenced == "stale":
                return  # sent before it was taken for dead (ZeroMQ delivers a gone peer's queued messages)
            reason = (f"a newer process registered as worker {header.worker_id!r}" if fenced
                      else self._refusal(header))
            if reason:
                self._send_cluster(identity, cluster_header(pb.WORKER_REFUSED, reason=reason), must=False)
                return
            older = self.table.by_name(header.worker_id)
            if older is not None:  # restarted (a new process under the same worker id): the old one's sessions are lost
                self._lose_worker(older.identity, "a new process registered under its worker id", how="superseded")
            worker = self.table.workers[identity] = WorkerInfo(identity, header.worker_id, header.role,
                                                               header.kv_address, time.monotonic())
            worker.draining = worker.name in self.drain.names()
            self._send_cluster(identity, cluster_header(pb.WORKER_ACCEPTED), must=False)
            log.info("worker %s (%s) registered, KV at %s", header.worker_id, header.role, header.kv_address,
                     extra={"event": "worker_registered"})
        worker.last_seen = time.monotonic()
        worker.latency.CopyFrom(header.latency)
        worker.kv_free_positions = header.kv_free_positions

    def _refusal(self, header: pb.ClusterHeader) -> str:
        m = self.manifest
        if header.role not in ("prefill", "decode"):
            return f"role {header.role!r}: a worker is prefill or decode"
        if header.fingerprint != m.source_fingerprint or (header.first_layer, header.last_layer) != tuple(m.middle_layers):
            return (f"the worker serves layers [{header.first_layer}, {header.last_layer}) of checkpoint "
                    f"{header.fingerprint[:12]}; this router's bundle is layers [{m.middle_layers[0]}, "
                    f"{m.middle_layers[1]}) of {m.source_fingerprint[:12]}")
        return ""

    def _on_adopted(self, identity: bytes, header: pb.ClusterHeader) -> None:
        session = self.table.sessions.get(header.session.session_id)
        if session is None or session.worker != identity or not session.handoff_began:
            return  # not the handoff under way (a stale or stray message)
        c = self.counters
        if header.ok:
            seconds = time.monotonic() - session.handoff_began
            c.handoffs += 1
            c.handoff_bytes += header.kv_bytes
            c.handoff_positions += header.length
            c.handoff_seconds += seconds
            self.metrics.observe("hat_handoff_seconds", seconds)
        else:  # the target failed the session's held FORWARDs; the device re-opens
            c.handoff_failures += 1
            self.table.forget(header.session.session_id)
            log.warning("handoff of session %s failed: %s", header.session.session_id, header.reason,
                        extra={"session": header.session.session_id, "event": "handoff_failed"})
        session.handoff_began = 0.0

    # housekeeping

    def _housekeeping(self) -> None:
        for worker in self.table.silent_workers():
            self._lose_worker(worker.identity, f"silent for over {self.config.worker_timeout_s:g} s")
        self._fence.prune()
        self._drain_round()
        move = self.table.rebalance_move()
        if move is not None:
            self.counters.rebalance_moves += 1
            self._hand_off(*move)
        deadline = time.monotonic() - self.config.session_idle_timeout_s
        for session_id, session in list(self.table.sessions.items()):
            if session.last_active < deadline and not session.inflight:
                self.table.forget(session_id)

    def _drain_round(self) -> None:
        """Drop the drained workers since stopped; move what idle sessions can leave draining workers; publish which
        are empty (see cloud/worker_drain.py)."""
        for name in self.drain.take_stopped():
            worker = self.table.by_name(name)
            if worker is not None:
                self._lose_worker(worker.identity, "stopped after draining", how="retired")
        names = self.drain.names()
        for session, target in self.table.drain_moves(names):
            self._hand_off(session, target)
        self.drain.publish(self.table.drained(names))

    def _lose_worker(self, identity: bytes, why: str, how: str = "lost") -> None:
        """Drop a worker: `how` "lost" (dead or gone), "superseded" (a new process under its id) or "retired"."""
        worker = self.table.workers.pop(identity, None)
        if worker is None:
            return
        if how == "retired":
            self.counters.workers_retired += 1
        else:
            self.counters.workers_lost += 1
        # its queued heartbeats must not register it again; one alive keeps beating and is taken back later, unless a
        # newer process took its worker id
        (self._fence.superseded if how == "superseded" else self._fence.lost)(identity)
        log.log(logging.INFO if how == "retired" and not worker.sessions else logging.WARNING,
                "worker %s (%s) %s: %s; %d sessions must be re-sent", worker.name, worker.role, how, why,
                len(worker.sessions), extra={"event": f"worker_{how}"})
        for key, flight in list(self._inflight.items()):
            if flight.worker == identity:
                del self._inflight[key]
                self._reply_error(key[0], flight.header, WireError(
                    pb.UNKNOWN_SESSION, "the worker holding the session failed; re-send the history"))
        for session_id in list(worker.sessions):
            self.table.sessions.pop(session_id, None)

    def _drop_session(self, session: RoutedSession) -> None:
        if session.worker in self.table.workers:
            self._send_cluster(session.worker, cluster_header(pb.DROP, session=session.meta), must=False)
        self.table.forget(session.meta.session_id)

    def _send_cluster(self, identity: bytes, header: pb.ClusterHeader, must: bool = True) -> None:
        try:
            self._workers.send_multipart([identity, *encode_cluster(header)])
        except zmq.ZMQError:
            if must:
                self._lose_worker(identity, "its connection is gone")

    def _reply_error(self, owner: bytes, request: pb.DataHeader | None, exc: WireError) -> None:
        self.counters.errors += 1
        self.metrics.add_error(pb.ErrorCode.Name(exc.code))
        self._devices.send_multipart([owner, *wire.encode(wire.error_header(request, exc.code, str(exc),
                                                                             exc.retry_after_ms))])

    def _register_metrics(self) -> None:
        c, table = self.counters, self.table
        self.metrics.families.append(self.registry.telemetry_families)
        self.metrics.gauges.update({
            "hat_router_sessions": ("sessions routed", lambda: len(table.sessions)),
            "hat_router_workers": ("workers alive", lambda: len(table.workers)),
            "hat_router_workers_draining": ("workers moving their sessions off before they stop",
                                            lambda: len(table.workers) - len(table.serving())),
            "hat_router_inflight": ("requests forwarded and not yet answered", lambda: len(self._inflight)),
        })
        self.metrics.counters.update({
            "hat_handoffs_total": ("KV handoffs completed", lambda: c.handoffs),
            "hat_handoff_failures_total": ("KV handoffs that failed", lambda: c.handoff_failures),
            "hat_handoff_bytes_total": ("KV bytes handed off", lambda: c.handoff_bytes),
            "hat_handoff_positions_total": ("positions handed off", lambda: c.handoff_positions),
            "hat_rebalance_moves_total": ("decode sessions moved between decode workers", lambda: c.rebalance_moves),
            "hat_workers_lost_total": ("workers taken for dead", lambda: c.workers_lost),
            "hat_workers_retired_total": ("workers stopped after draining", lambda: c.workers_retired),
        })

    def stop(self, grace_s: float = 2.0, drain_s: float = 0.0) -> None:
        self.draining = self.control.draining = True
        deadline = time.monotonic() + drain_s
        while self.table.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 5)
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait()
        if self.security is not None:
            self.security.stop()
        self._context.term()

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
