"""The data plane: a ZeroMQ ROUTER loop that answers OPEN, FORWARD and CLOSE from many devices.

Each turn drains what has arrived, answers control-like messages at once, and runs every
session's pending FORWARD in one batched forward of the middle part (one FORWARD per session per
batch, up to the token budget; the rest wait for the next turn). A bad message is answered with
an ERROR to its sender alone.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import zmq

from hat.common import wire
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError, WireLimits

from .config import CloudConfig
from .device_registry import DeviceRegistry
from .middle_worker import ForwardJob, MiddleWorker
from .session_store import SessionStore
from .stats import CloudStats

log = logging.getLogger("hat.cloud")
_HOUSEKEEPING_INTERVAL_S = 1.0  # how often idle sessions are looked for


class DataServer:
    def __init__(self, config: CloudConfig, socket: zmq.Socket, store: SessionStore, registry: DeviceRegistry,
                 worker: MiddleWorker, stats: CloudStats):
        self.config, self.socket, self.store, self.registry, self.worker, self.stats = (
            config, socket, store, registry, worker, stats)
        # bytes of the largest FORWARD in the widest dtype; the token count is checked on its own as well
        self.limits = WireLimits(max_tensor_bytes=config.max_tokens_per_message * worker.part.spec.hidden_size * 4)
        self._pending: deque[ForwardJob] = deque()

    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        last_housekeeping = time.monotonic()
        while not stop.is_set():
            if not self._pending:
                poller.poll(timeout=self.config.poll_interval_s * 1000)
            self._drain()
            self._run_batch()
            if time.monotonic() - last_housekeeping > _HOUSEKEEPING_INTERVAL_S:
                last_housekeeping = time.monotonic()
                for session_id in self.store.expire_idle():
                    log.info("session %s expired after %.0f s idle", session_id, self.config.session_idle_timeout_s)

    def _drain(self) -> None:
        while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.socket.recv_multipart(copy=False)
            self._handle(frames[0].bytes, frames[1:])

    def _handle(self, owner: bytes, frames: list) -> None:
        header = None
        try:
            message = wire.decode(frames, self.limits)
            header = message.header
            if header.kind == pb.OPEN:
                if not self.registry.is_registered(header.device_id):
                    raise WireError(pb.NOT_REGISTERED, f"device {header.device_id!r} has not registered with the "
                                                        "control plane")
                self.store.open(header.session_id, header.device_id, owner)
                self._reply(owner, wire.make_header(pb.OPENED, header.session_id, header.sequence))
            elif header.kind == pb.CLOSE:
                self.store.close(header.session_id, owner)
                self._reply(owner, wire.make_header(pb.CLOSED, header.session_id, header.sequence))
            elif header.kind == pb.FORWARD:
                if header.num_tokens > self.config.max_tokens_per_message:
                    raise WireError(pb.BAD_TENSOR, f"{header.num_tokens} tokens in one message; this cloud takes at most "
                                                   f"{self.config.max_tokens_per_message} (see RegisterReply)")
                # checked against the cache when its batch runs: earlier FORWARDs of the session may be queued
                self._pending.append(ForwardJob(owner, header, message.tensor, self.store.get(header.session_id, owner)))
            else:
                raise WireError(pb.MALFORMED, f"the cloud does not accept {pb.MessageKind.Name(header.kind)} messages")
        except WireError as exc:
            self._reply_error(owner, header or exc.header, exc)

    def _run_batch(self) -> None:
        jobs, sessions, tokens, deferred = [], set(), 0, deque()
        while self._pending:
            job = self._pending.popleft()
            count = job.hidden.shape[0]
            if job.header.session_id in sessions or (jobs and tokens + count > self.config.max_batch_tokens):
                deferred.append(job)
                continue
            try:
                job.session = self.store.get(job.header.session_id, job.owner)  # closed or expired while queued?
                self.worker.check(job)
            except WireError as exc:
                self._reply_error(job.owner, job.header, exc)
                continue
            jobs.append(job)
            sessions.add(job.header.session_id)
            tokens += count
        self._pending = deferred
        if not jobs:
            return
        began = time.perf_counter()
        results = self.worker.run(jobs)
        compute_us = int((time.perf_counter() - began) * 1e6)
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
                                      batch_sessions=len(jobs))
            self._reply(owner=job.owner, header=header, tensor=result)

    def _reply(self, owner: bytes, header: pb.DataHeader, tensor=None) -> None:
        self.socket.send_multipart([owner, *wire.encode(header, tensor)], copy=False)

    def _reply_error(self, owner: bytes, request: pb.DataHeader | None, exc: WireError) -> None:
        self.stats.errors += 1
        log.info("refused %s from session %r: %s", pb.ErrorCode.Name(exc.code),
                 request.session_id if request else "?", exc)
        self._reply(owner, wire.error_header(request, exc.code, str(exc)))
