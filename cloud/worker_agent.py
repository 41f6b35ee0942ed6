"""A prefill or decode worker's side of a disaggregated cloud: registration, heartbeats and KV handoff.

The worker's data plane is a DEALER connected to the router: device messages arrive as
[device routing id, header, tensor] exactly as on a ROUTER, and replies go back the same way.
Cluster messages are [b"", ClusterHeader]. The agent
- announces the worker (role, KV address, bundle fingerprint, load, latency predictor) in every
  heartbeat; the first one registers it, so a restarted router learns its workers again;
- on HANDOFF pushes a session's KV layer by layer to the target worker's KV socket and drops it;
- on ADOPT opens the session (reserving its KV blocks) and holds its FORWARDs until every layer has
  arrived (KV may arrive before the ADOPT: it waits); a handoff that does not complete within
  `handoff_timeout_s` fails the held FORWARDs with UNKNOWN_SESSION, so the device re-sends its history.
Cluster messages and KV are handled on the data plane's socket thread (a handoff never waits behind a
forward: the router sends HANDOFF only when the session has nothing in flight, and the engine leaves
an incoming session's cache alone while it is held); the engine thread reads `held()` and expires.
"""
from __future__ import annotations

import logging
import os
import socket as socketlib
import threading
import time
from dataclasses import dataclass, field

import zmq

from hat.common.bundle import BundleManifest
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError

from .cluster_protocol import ClusterError, cluster_header, decode_kv_layer, encode_cluster, encode_kv_layer
from .config import CloudConfig
from .latency_model import CloudLatencyModel
from .session_store import CloudSession, SessionStore

log = logging.getLogger("hat.cloud")
_PEER_LINGER_MS = 1000  # at shutdown, how long KV still queued for a peer may take to go


@dataclass(slots=True)
class IncomingSession:
    """A session whose KV is on its way to this worker."""
    since: float  # monotonic time the ADOPT (or its first KV layer) arrived
    meta: pb.SessionMeta | None = None  # from the ADOPT; None while only KV has come
    handoff_id: int = 0  # the ADOPT's handoff; KV layers of any other are refused
    layers: set[int] = field(default_factory=set)  # layers written so far
    early: list = field(default_factory=list)  # KV messages that came before the ADOPT
    kv_bytes: int = 0  # bytes received


def advertised(address: str) -> str:
    """A bound tcp address as peers on other hosts can reach it (a wildcard host becomes this host's name)."""
    scheme, _, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = socketlib.gethostname()
    return f"{scheme}://{host}:{port}"


class WorkerAgent:
    def __init__(self, config: CloudConfig, manifest: BundleManifest, store: SessionStore,
                 latency: CloudLatencyModel, kv_address: str, context: zmq.Context, protect_peer=None):
        self.config, self.manifest, self.store, self.latency = config, manifest, store, latency
        self._context = context
        self._protect_peer = protect_peer  # makes a KV socket to a peer a CURVE client (the cloud has keys), or None
        self.kv_address = kv_address  # as advertised to peers
        self.worker_id = config.worker_id or f"{config.role}-{socketlib.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
        # its connection's routing id at the router: the worker id and a nonce of this process, so a process restarted
        # under the same worker id is a new connection the router admits at once (see cloud/worker_fence.py)
        self.routing_id = f"{self.worker_id}@{os.urandom(8).hex()}".encode()
        self.incoming: dict[str, IncomingSession] = {}
        self._lock = threading.RLock()  # `incoming` is touched by the socket thread and read by the engine
        self.accepted: bool | None = None  # the router's answer to the registration (None = none yet)
        self.refusal = ""
        self.pending_tokens = lambda: 0  # tokens waiting in the data plane (set by the data server)
        self.handoffs_out = self.handoffs_in = 0
        self._peers: dict[str, zmq.Socket] = {}  # KV address -> PUSH socket (engine thread only)
        part = store.part
        self._kv_layout = (part.num_layers, part.spec.num_kv_heads, part.spec.head_dim)

    def held(self) -> set[str]:
        """Sessions whose FORWARDs must wait: their KV is not in place yet."""
        with self._lock:
            return set(self.incoming)

    def announcement(self, kind: int = pb.HEARTBEAT) -> list:
        """A REGISTER or HEARTBEAT (built on the socket thread from a snapshot of the load)."""
        budget, first_last = self.store.budget, self.manifest.middle_layers
        free = (budget.total_blocks - budget.used_blocks) * budget.block_tokens
        return encode_cluster(cluster_header(
            kind, worker_id=self.worker_id, role=self.config.role, kv_address=self.kv_address,
            fingerprint=self.manifest.source_fingerprint, first_layer=first_last[0], last_layer=first_last[1],
            sessions=len(self.store), pending_tokens=self.pending_tokens(), kv_free_positions=max(0, free),
            latency=self.latency.reply(0, 0.0)))

    def on_control(self, header: pb.ClusterHeader, reply_cluster, fail_held) -> None:
        """A cluster message from the router. `reply_cluster(header)` sends one back; `fail_held(session_id, error)`
        answers the session's held FORWARDs with an error."""
        with self._lock:
            self._on_control(header, reply_cluster, fail_held)

    def _on_control(self, header: pb.ClusterHeader, reply_cluster, fail_held) -> None:
        kind, meta = header.kind, header.session
        if kind in (pb.WORKER_ACCEPTED, pb.WORKER_REFUSED):  # either way the router routes none of its sessions now
            if kind == pb.WORKER_REFUSED and self.accepted is not False:  # (refused at every heartbeat: log it once)
                log.error("the router refused this worker: %s", header.reason, extra={"event": "worker_refused"})
            self.accepted, self.refusal = kind == pb.WORKER_ACCEPTED, header.reason
            self.incoming.clear()
            for session_id in self.store.clear():
                fail_held(session_id, WireError(pb.UNKNOWN_SESSION, "the router lost track of this worker's "
                                                                    "sessions; re-send the history"))
        elif kind == pb.ADOPT:
            self._adopt(meta, header.handoff_id, reply_cluster, fail_held)
        elif kind == pb.HANDOFF:
            self._hand_off(meta.session_id, header.kv_address, header.handoff_id)
        elif kind == pb.DROP:
            self.incoming.pop(meta.session_id, None)
            self.store.discard(meta.session_id)
        else:
            raise ClusterError(f"a worker does not take {pb.ClusterKind.Name(kind)} from the router")

    def _adopt(self, meta: pb.SessionMeta, handoff_id: int, reply_cluster, fail_held) -> None:
        entry = self.incoming.setdefault(meta.session_id, IncomingSession(time.monotonic()))
        entry.meta, entry.handoff_id = meta, handoff_id
        try:
            self.store.open(meta.session_id, meta.device_id, meta.owner, meta.max_positions, meta.ttft_slo_ms / 1000,
                            meta.tbt_slo_ms / 1000)
        except WireError as exc:
            self.incoming.pop(meta.session_id, None)
            reply_cluster(cluster_header(pb.ADOPTED, session=meta, ok=False, reason=str(exc)))
            fail_held(meta.session_id, WireError(pb.UNKNOWN_SESSION, f"the session could not move to a decode "
                                                                    f"worker ({exc}); re-send the history"))
            return
        early, entry.early = entry.early, []
        for frames in early:
            try:
                self._on_kv(frames, reply_cluster)
            except ClusterError as exc:  # e.g. a late layer of an earlier handoff: the right ones still count
                log.warning("dropped an early KV layer: %s", exc, extra={"event": "cluster_error"})

    def on_kv(self, frames: list, reply_cluster) -> None:
        """One KV layer from a peer worker."""
        with self._lock:
            self._on_kv(frames, reply_cluster)

    def _on_kv(self, frames: list, reply_cluster) -> None:
        header, keys, values = decode_kv_layer(frames, self._kv_layout, self.store.part.dtype)
        session_id = header.session.session_id
        if session_id not in self.incoming and self.store.peek(session_id) is not None:
            raise ClusterError(f"KV for session {session_id!r}, which this worker holds and is not adopting")
        entry = self.incoming.setdefault(session_id, IncomingSession(time.monotonic()))
        if entry.meta is None:
            entry.early.append(frames)
            return
        if header.handoff_id != entry.handoff_id:
            raise ClusterError(f"KV of handoff {header.handoff_id} for session {session_id!r}, which is adopting "
                               f"handoff {entry.handoff_id}")
        session = self.store.peek(session_id)
        cache = session.cache if session is not None else None
        if cache is None or header.length > cache.max_length:
            raise ClusterError(f"KV of {header.length} positions for session {session_id!r}, which holds "
                               f"{cache.max_length if cache else 0}")
        if not entry.layers:
            cache.begin_write(0, header.length)
        cache.keys[header.layer, :, :header.length] = keys
        cache.values[header.layer, :, :header.length] = values
        entry.layers.add(header.layer)
        entry.kv_bytes += keys.numel() * keys.element_size() * 2
        if len(entry.layers) == header.num_layers:
            cache.commit(header.length)
            del self.incoming[session_id]
            self.handoffs_in += 1
            reply_cluster(cluster_header(pb.ADOPTED, session=entry.meta, ok=True, kv_bytes=entry.kv_bytes,
                                         length=header.length))

    def _hand_off(self, session_id: str, target: str, handoff_id: int) -> None:
        session: CloudSession | None = self.store.take(session_id)
        if session is None:  # expired or closed meanwhile: the target times out and the device re-sends
            log.warning("handoff of unknown session %s", session_id, extra={"session": session_id, "event": "handoff"})
            return
        peer = self._peers.get(target)
        if peer is None:
            peer = self._peers[target] = self._context.socket(zmq.PUSH)
            peer.setsockopt(zmq.LINGER, _PEER_LINGER_MS)
            if self._protect_peer is not None:
                self._protect_peer(peer)
            peer.connect(target)
        meta = pb.SessionMeta(session_id=session_id, device_id=session.device_id, owner=session.owner,
                              max_positions=session.cache.max_length, ttft_slo_ms=int(session.ttft_slo_s * 1000),
                              tbt_slo_ms=int(session.tbt_slo_s * 1000))
        for layer in range(session.cache.num_layers):
            peer.send_multipart(encode_kv_layer(meta, session.cache, layer, handoff_id), copy=False)
        self.handoffs_out += 1

    def expire_incoming(self, fail_held, reply_cluster) -> None:
        with self._lock:
            self._expire_incoming(fail_held, reply_cluster)

    def _expire_incoming(self, fail_held, reply_cluster) -> None:
        deadline = time.monotonic() - self.config.handoff_timeout_s
        for session_id, entry in list(self.incoming.items()):
            if entry.since < deadline:
                del self.incoming[session_id]
                if entry.meta is None:  # stray KV that no ADOPT claimed: nothing was opened for it
                    continue
                self.store.discard(session_id)
                log.warning("handoff of session %s did not complete in %.0f s", session_id,
                            self.config.handoff_timeout_s, extra={"session": session_id, "event": "handoff_failed"})
                reply_cluster(cluster_header(pb.ADOPTED, session=entry.meta, ok=False, reason="timed out"))
                fail_held(session_id, WireError(pb.UNKNOWN_SESSION, "the session's KV did not reach this worker; "
                                                                    "re-send the history"))

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
