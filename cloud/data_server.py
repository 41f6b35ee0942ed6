"""The data plane: a ZeroMQ ROUTER that answers OPEN, FORWARD and CLOSE from many devices.

Two threads. The socket thread owns the ROUTER: it stamps each message with its arrival time (so a
device can measure its uplink from the cloud's clock even while a forward runs) and queues it, and
it sends the replies the engine hands it over an inproc socket. The engine thread takes what has
arrived, answers control-like messages at once, and runs a batch the scheduler forms from the pending
FORWARDs (one per session, decode rounds before prompt chunks, up to the token budget) in one forward
of the middle part; the rest wait for the next turn. A bad message is answered with an ERROR to its sender alone. Every
reply carries the arrival time of its request and its own send time on the cloud's monotonic clock.

As a prefill or decode worker behind a router, the socket is a DEALER connected to the router (device
messages look the same), a second socket takes KV handoffs from peer workers, and a WorkerAgent
handles the cluster messages; FORWARDs of a session whose KV is still arriving wait in the queue.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque

import zmq

from hat.common import wire
from hat.common.cost_fit import attended
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError, WireLimits

from .cluster_protocol import ClusterError, decode_cluster_header, encode_cluster
from .config import CloudConfig
from .device_limits import DeviceLimits
from .device_registry import DeviceRegistry
from .latency_model import CloudLatencyModel
from .metrics import CloudMetrics
from .middle_worker import ForwardJob, MiddleWorker
from .scheduler import form_batch
from .session_store import SessionStore
from .stats import CloudStats
from .worker_agent import WorkerAgent

log = logging.getLogger("hat.cloud")
_HOUSEKEEPING_INTERVAL_S = 1.0  # how often idle sessions are looked for
_inproc_ids = itertools.count()


def now_us() -> int:
    """The cloud's clock for timestamps on the wire: monotonic microseconds."""
    return time.monotonic_ns() // 1000


class DataServer:
    def __init__(self, config: CloudConfig, socket: zmq.Socket, store: SessionStore, registry: DeviceRegistry | None,
                 worker: MiddleWorker, stats: CloudStats, latency: CloudLatencyModel, metrics: CloudMetrics,
                 agent: WorkerAgent | None = None, kv_socket: zmq.Socket | None = None):
        """`registry` None: devices were checked upstream (a worker behind a router). `agent` and `kv_socket`: this
        is a prefill or decode worker; its cluster messages and KV are handled on the socket thread."""
        self.config, self.socket, self.store, self.registry, self.worker, self.stats, self.latency = (
            config, socket, store, registry, worker, stats, latency)
        self.metrics, self.agent, self.kv_socket = metrics, agent, kv_socket
        if agent is not None:
            agent.pending_tokens = lambda: self.pending_work()[0]
        # bytes of the largest FORWARD in the widest dtype; the token count is checked on its own as well
        self.limits = WireLimits(max_tensor_bytes=config.max_tokens_per_message * worker.part.spec.hidden_size * 4)
        self._pending: deque[ForwardJob] = deque()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # (arrival_us, frames) of devices; None: wake up
        self._failures: queue.SimpleQueue = queue.SimpleQueue()  # (session id, error) for held FORWARDs to fail
        self._outbox_address = f"inproc://hat-replies-{id(self)}-{next(_inproc_ids)}"
        self._outbox: zmq.Socket | None = None  # the engine's end of the reply path
        self.draining = False  # set at shutdown: new sessions are refused, running ones go on
        self._depth = getattr(worker.part, "stages", 1)  # batches in flight at once (a pipeline's stages)
        self._in_flight: deque = deque()  # (jobs, began_us, began, timed) submitted to the pipeline, oldest first
        self.security = None  # CloudSecurity of a cloud that serves devices with keys: each message's sender is checked
        self.limits_per_device = DeviceLimits(config.device_limits, config.overload_retry_ms)  # devices served directly

    def pending_work(self) -> tuple[int, float]:
        """Tokens and query-key pairs of the FORWARDs waiting for a batch (read from another thread: a snapshot)."""
        jobs = list(self._pending)
        return (sum(j.hidden.shape[0] for j in jobs),
                sum(attended(j.hidden.shape[0], j.header.start) for j in jobs))

    def serve(self, stop: threading.Event) -> None:
        context = self.socket.context
        replies = context.socket(zmq.PULL)
        replies.setsockopt(zmq.LINGER, 0)
        replies.bind(self._outbox_address)
        self._outbox = context.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.connect(self._outbox_address)
        io = threading.Thread(target=self._socket_loop, args=(stop, replies), name="hat-data-socket", daemon=True)
        io.start()
        try:
            self._engine_loop(stop)
        finally:
            stop.set()
            io.join()
            if self.agent is not None:
                self.agent.close()
            self._outbox.close(linger=0)
            replies.close(linger=0)

    def _socket_loop(self, stop: threading.Event, replies: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        if self.kv_socket is not None:
            poller.register(self.kv_socket, zmq.POLLIN)
        timeout_ms = self.config.poll_interval_s * 1000
        if self.agent is not None:
            timeout_ms = min(timeout_ms, self.config.heartbeat_interval_s * 1000)
            self._announce(pb.WORKER_REGISTER)
        last_heartbeat = time.monotonic()
        while not stop.is_set():
            ready = dict(poller.poll(timeout=timeout_ms))
            if self.socket in ready:
                while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frames = self.socket.recv_multipart(copy=False)
                    if frames[0].bytes:
                        if self.registry is not None and not self._within_rate(frames):
                            continue
                        self._inbox.put((now_us(), frames))
                    else:
                        self._handle_cluster(frames, from_peer=False)
            if self.kv_socket in ready:
                while self.kv_socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._handle_cluster(self.kv_socket.recv_multipart(copy=False), from_peer=True)
            if self.agent is not None and time.monotonic() - last_heartbeat > self.config.heartbeat_interval_s:
                last_heartbeat = time.monotonic()
                self._announce()
            if replies in ready:
                while replies.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self.socket.send_multipart(replies.recv_multipart(copy=False), copy=False)

    def _announce(self, kind: int = pb.HEARTBEAT) -> None:
        """Register with the router or beat; never blocks: with no router connection (the router refused our key,
        or dropped us) the message is skipped, and the next heartbeat tries again (a heartbeat registers too)."""
        try:
            self.socket.send_multipart(self.agent.announcement(kind), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _engine_loop(self, stop: threading.Event) -> None:
        last_housekeeping = time.monotonic()
        while not stop.is_set():
            self._take(block=not self._pending and not self._in_flight)
            self._run_batch()
            if time.monotonic() - last_housekeeping > _HOUSEKEEPING_INTERVAL_S:
                last_housekeeping = time.monotonic()
                if self.agent is not None:
                    self.agent.expire_incoming(self._fail_held, self._reply_cluster)
                for session_id in self.store.expire_idle():
                    log.info("session %s expired after %.0f s idle", session_id, self.config.session_idle_timeout_s,
                             extra={"session": session_id, "event": "expired"})

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.config.poll_interval_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                arrival_us, frames = item
                self._handle(frames[0].bytes, frames[1:], arrival_us)
            while not self._failures.empty():
                self._fail_held(*self._failures.get_nowait())
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, owner: bytes, frames: list, arrival_us: int = 0) -> None:
        header = None
        try:
            message = wire.decode(frames, self.limits)
            header = message.header
            if self.security is not None:
                self.security.authorize(frames[0], header.device_id if header.kind == pb.OPEN else None)
            if header.kind == pb.OPEN:
                if self.registry is not None and not self.registry.is_registered(header.device_id):
                    raise WireError(pb.NOT_REGISTERED, f"device {header.device_id!r} has not registered with the "
                                                        "control plane")
                if self.registry is not None and not self.store.holds(header.session_id, owner):
                    self.limits_per_device.check_sessions(header.device_id, self.store.sessions_of(header.device_id))
                if self.draining:
                    raise WireError(pb.OVERLOADED, "the cloud is shutting down and takes no new sessions")
                c = self.config
                self.store.open(header.session_id, header.device_id, owner, header.max_positions,
                                (header.ttft_slo_ms or c.default_ttft_slo_ms) / 1000,
                                (header.tbt_slo_ms or c.default_tbt_slo_ms) / 1000,
                                arrival_us / 1e6 if arrival_us else None)  # now_us is time.monotonic's clock
                self._reply(owner, wire.make_header(pb.OPENED, header.session_id, header.sequence,
                                                    arrival_us=arrival_us))
            elif header.kind == pb.CLOSE:
                self.store.close(header.session_id, owner)
                self._reply(owner, wire.make_header(pb.CLOSED, header.session_id, header.sequence,
                                                    arrival_us=arrival_us))
            elif header.kind == pb.FORWARD:
                if header.num_tokens > self.config.max_tokens_per_message:
                    raise WireError(pb.BAD_TENSOR, f"{header.num_tokens} tokens in one message; this cloud takes at most "
                                                   f"{self.config.max_tokens_per_message} (see RegisterReply)")
                # checked against the cache when its batch runs: earlier FORWARDs of the session may be queued
                self._pending.append(ForwardJob(owner, header, message.tensor, self.store.get(header.session_id, owner),
                                                arrival_us))
            else:
                raise WireError(pb.MALFORMED, f"the cloud does not accept {pb.MessageKind.Name(header.kind)} messages")
        except WireError as exc:
            self._reply_error(owner, header or exc.header, exc)

    def _within_rate(self, frames: list) -> bool:
        """On the socket thread: a device connection over its message rate is answered OVERLOADED here, at once
        (not logged one by one: a flood would flood the log; `limits_per_device.refusals` counts them)."""
        try:
            self.limits_per_device.check_rate(frames[0].bytes)
            return True
        except WireError as exc:
            try:
                request = wire.decode(frames[1:], self.limits).header
            except WireError:
                request = None
            self.stats.errors += 1
            self.socket.send_multipart([frames[0].bytes, *wire.encode(
                wire.error_header(request, exc.code, str(exc), exc.retry_after_ms))], copy=False)
            return False

    def _handle_cluster(self, frames: list, from_peer: bool) -> None:
        """On the socket thread, so a handoff never waits for a forward: a KV layer from a peer, or
        [b"", ClusterHeader] from the router. The engine is woken after (a held session may be ready)."""
        try:
            if self.agent is None:
                raise ClusterError("this cloud is not a worker behind a router")
            if from_peer:
                self.agent.on_kv(frames, self._send_cluster)
            elif len(frames) != 2:
                raise ClusterError(f"a cluster message is 2 frames, got {len(frames)}")
            else:
                self.agent.on_control(decode_cluster_header(frames[1]), self._send_cluster,
                                      lambda session_id, error: self._failures.put((session_id, error)))
        except (ClusterError, WireError) as exc:
            self.stats.errors += 1
            log.warning("dropped a cluster message: %s", exc, extra={"event": "cluster_error"})
        self._inbox.put(None)

    def _send_cluster(self, header: pb.ClusterHeader) -> None:
        """To the router, from the socket thread."""
        self.socket.send_multipart(encode_cluster(header))

    def _reply_cluster(self, header: pb.ClusterHeader) -> None:
        """To the router, from the engine thread."""
        self._outbox.send_multipart(encode_cluster(header))

    def _fail_held(self, session_id: str, error: WireError) -> None:
        """Answer the queued FORWARDs of `session_id` with `error` and drop them."""
        failed = [job for job in self._pending if job.header.session_id == session_id]
        self._pending = deque(job for job in self._pending if job.header.session_id != session_id)
        for job in failed:
            self._reply_error(job.owner, job.header, error)

    def _run_batch(self) -> None:
        """Form and run the next batch. With a pipeline-parallel middle part, up to `stages` batches are in flight
        (a session's next prompt chunk may enter stage 0 while its previous one is on a later stage); the oldest is
        collected once the pipeline is full or no new batch could be formed."""
        jobs = self._next_batch()
        if self._depth == 1:
            if jobs:
                began_us, began = now_us(), time.perf_counter()
                self._finish(jobs, self.worker.run(jobs), began_us, time.perf_counter() - began, timed=True)
            return
        if jobs:
            began_us, began = now_us(), time.perf_counter()
            timed = not self._in_flight  # an empty pipeline: the batch's time is its own (the predictor learns it)
            try:
                self.worker.submit(jobs)
                self._in_flight.append((jobs, began_us, began, timed))
            except Exception:  # refused by stage 0: finish what is in flight, then run each job alone
                self._drain_pipeline()
                self._finish(jobs, self.worker.run(jobs), began_us, time.perf_counter() - began, timed=False)
        if self._in_flight and (len(self._in_flight) >= self._depth or not jobs):
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        jobs, began_us, began, timed = self._in_flight.popleft()
        results = self.worker.collect(jobs)
        self._finish(jobs, results, began_us, time.perf_counter() - began, timed)

    def _drain_pipeline(self) -> None:
        while self._in_flight:
            self._collect_oldest()

    def _next_batch(self) -> list[ForwardJob]:
        """The scheduler's next batch of pending FORWARDs (held sessions' wait), each checked against its session."""
        pending = self._pending
        held = self.agent.held() if self.agent is not None else ()
        if held:
            pending = deque(job for job in pending if job.header.session_id not in held)
        chosen, rest = form_batch(pending, self.config.max_batch_tokens, self.latency.cost)
        if held:
            taken = {id(job) for job in chosen}
            rest = deque(job for job in self._pending if id(job) not in taken)
        self._pending = rest
        jobs = []
        for job in chosen:
            try:
                job.session = self.store.get(job.header.session_id, job.owner)  # closed or expired while queued?
                self.worker.check(job)
            except WireError as exc:
                self._reply_error(job.owner, job.header, exc)
                continue
            jobs.append(job)
        return jobs

    def _finish(self, jobs: list[ForwardJob], results: list, began_us: int, compute_s: float, timed: bool) -> None:
        """Reply to each job of a batch that ran; `timed`: its time is a sample for the latency predictor."""
        tokens = sum(job.hidden.shape[0] for job in jobs)
        compute_us = int(compute_s * 1e6)
        if timed:
            self.latency.add_batch([(job.hidden.shape[0], int(job.header.start)) for job in jobs], compute_s)
        self._record_batch(jobs, tokens, compute_s, began_us)
        self.stats.forward_batches += 1
        self.stats.forward_tokens += tokens
        self.stats.max_batch_sessions = max(self.stats.max_batch_sessions, len(jobs))
        for job, result in zip(jobs, results):
            if isinstance(result, WireError):
                self._reply_error(job.owner, job.header, result)
                continue
            start = job.header.start + job.hidden.shape[0] - result.shape[0]
            # no session id: the device matches replies by sequence, and the id would be most of the header
            header = wire.make_header(pb.RESULT, "", job.header.sequence, start=start,
                                      cache_length=job.session.cache.length, compute_us=compute_us,
                                      batch_sessions=len(jobs), arrival_us=job.arrival_us,
                                      queue_us=max(0, began_us - job.arrival_us))
            self._reply(owner=job.owner, header=header, tensor=result)
            self._record_reply(job)

    def _record_batch(self, jobs: list[ForwardJob], tokens: int, compute_s: float, began_us: int) -> None:
        m = self.metrics
        m.observe("hat_batch_sessions", len(jobs))
        m.observe("hat_batch_tokens", tokens)
        m.observe("hat_forward_seconds", compute_s)
        for job in jobs:
            m.observe("hat_queue_seconds", max(0, began_us - job.arrival_us) / 1e6)
            m.add_tokens("prefill" if job.header.append_only else "decode", job.hidden.shape[0])

    def _record_reply(self, job: ForwardJob) -> None:
        """The cloud's view of a session's time to first token and time between rounds."""
        session, now = job.session, time.monotonic()
        if job.header.append_only:
            session.prompt_reply_s = now
            return
        if not session.round_reply_s and session.prompt_reply_s:  # the first round: the prompt was complete
            prefill_s = session.prompt_reply_s - session.opened_s
            self.metrics.observe("hat_prefill_seconds", prefill_s)
            if session.ttft_slo_s and prefill_s > session.ttft_slo_s:
                self.metrics.add_slo_miss("ttft")
        elif session.round_reply_s:
            interval = now - session.round_reply_s
            self.metrics.observe("hat_round_interval_seconds", interval)
            if session.tbt_slo_s and interval > session.tbt_slo_s:
                self.metrics.add_slo_miss("tbt")
        session.round_reply_s = now

    def _reply(self, owner: bytes, header: pb.DataHeader, tensor=None) -> None:
        header.sent_us = now_us()
        self._outbox.send_multipart([owner, *wire.encode(header, tensor)], copy=False)

    def _reply_error(self, owner: bytes, request: pb.DataHeader | None, exc: WireError) -> None:
        self.stats.errors += 1
        self.metrics.add_error(pb.ErrorCode.Name(exc.code))
        code = pb.ErrorCode.Name(exc.code)
        session = request.session_id if request else "?"
        log.info("refused %s from session %r: %s", code, session, exc,
                 extra={"session": session, "code": code, "event": "refused"})
        self._reply(owner, wire.error_header(request, exc.code, str(exc), exc.retry_after_ms))
