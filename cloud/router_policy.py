"""The router's view of its workers and sessions, and its decisions: where a session goes and when it moves.

- A new session goes to the prefill worker whose latency predictor says its queue clears soonest
  (tokens forwarded to it and not yet answered, costed by its own fitted predictor), among those
  with KV room for it; without prefill workers, any worker.
- A decode round of a session still on its prefill worker is aggregated handling; the session moves to
  a decode worker (its KV handed off) when the policy says so: "always", or "auto" when the prefill
  worker's predictor says this round would miss the session's time-between-tokens target.
- Decode sessions move from the busiest decode worker to the least busy when their session counts
  differ by at least the margin (one at a time, never a session with a request in flight or one that
  moved moments ago).
- A draining worker (being retired) takes nothing new; each of its sessions moves, at its first moment
  with nothing in flight, to the least loaded other worker of its role (else any other) with KV room.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from hat.common.cost_fit import LinearCost, attended
from hat.common.proto import hat_pb2 as pb

@dataclass(slots=True)
class WorkerInfo:
    identity: bytes  # its routing id on the router's worker socket
    name: str
    role: str  # "prefill" or "decode"
    kv_address: str  # where peers push KV to it
    last_seen: float  # monotonic time of its latest message
    latency: pb.LatencyReply = field(default_factory=pb.LatencyReply)  # its predictor, as last reported
    kv_free_positions: int = 0  # KV room it last reported
    sessions: set[str] = field(default_factory=set)  # sessions routed to it
    inflight_tokens: int = 0  # tokens forwarded to it, not yet answered
    inflight_attended: float = 0.0  # their query-key pairs
    inflight_requests: int = 0  # requests forwarded to it, not yet answered
    draining: bool = False  # being retired: no new sessions; its sessions move off

    @property
    def cost(self) -> LinearCost:
        r = self.latency
        return LinearCost(r.base_us / 1e6, r.per_token_us / 1e6, r.per_token_context_ns / 1e9)

    def queue_s(self) -> float:
        """Predicted time until the work forwarded to it so far is done."""
        return self.cost.batch(self.inflight_tokens, self.inflight_attended) if self.inflight_tokens else 0.0


@dataclass(slots=True)
class RoutedSession:
    meta: pb.SessionMeta  # id, device, owner, reserved positions, SLO targets
    worker: bytes  # the worker holding its KV
    last_active: float  # monotonic time of its latest message
    inflight: int = 0  # its requests forwarded and not yet answered
    moved_s: float = 0.0  # when it last moved (0 = never)
    handoff_began: float = 0.0  # when its latest handoff was ordered (0 = none under way)
    moved_from: bytes = b""  # the worker its latest handoff took it from


class WorkerTable:
    def __init__(self, policy: str, worker_timeout_s: float, rebalance_margin: int, move_cooldown_s: float):
        self.policy, self.worker_timeout_s, self.rebalance_margin = policy, worker_timeout_s, rebalance_margin
        self.move_cooldown_s = move_cooldown_s
        self.workers: dict[bytes, WorkerInfo] = {}
        self.sessions: dict[str, RoutedSession] = {}

    def by_name(self, name: str) -> WorkerInfo | None:
        return next((w for w in list(self.workers.values()) if w.name == name), None)

    def of_role(self, role: str) -> list[WorkerInfo]:
        return [w for w in list(self.workers.values()) if w.role == role]

    def serving(self, role: str = "") -> list[WorkerInfo]:
        """Workers (of `role`, or all) that take new sessions: not draining."""
        return [w for w in list(self.workers.values()) if not w.draining and w.role == (role or w.role)]

    def pick_prefill(self, positions: int) -> WorkerInfo | None:
        """The worker a new session of `positions` positions goes to (None: no worker has room)."""
        candidates = [w for w in self.serving("prefill") or self.serving() if w.kv_free_positions >= positions]
        return min(candidates, key=lambda w: (w.queue_s(), len(w.sessions)), default=None)

    def pick_decode(self, positions: int, exclude: bytes = b"") -> WorkerInfo | None:
        candidates = [w for w in self.serving("decode") if w.identity != exclude and w.kv_free_positions >= positions]
        return min(candidates, key=lambda w: (len(w.sessions), w.queue_s()), default=None)

    def should_move_to_decode(self, session: RoutedSession, tokens: int, start: int) -> bool:
        """At a decode round of a session on a prefill worker: hand it off now?"""
        source = self.workers.get(session.worker)
        if self.policy == "never" or source is None or source.role != "prefill" or session.inflight:
            return False
        if self.policy == "always":
            return True
        target = session.meta.tbt_slo_ms / 1000
        predicted = source.cost.batch(source.inflight_tokens + tokens,
                                      source.inflight_attended + attended(tokens, start))
        return bool(target) and predicted > target

    def rebalance_move(self) -> tuple[RoutedSession, WorkerInfo] | None:
        """A decode session to move and where, when decode workers' loads are uneven (else None)."""
        decoders = self.serving("decode")
        if len(decoders) < 2:
            return None
        busiest = max(decoders, key=lambda w: len(w.sessions))
        idlest = min(decoders, key=lambda w: len(w.sessions))
        if len(busiest.sessions) - len(idlest.sessions) < self.rebalance_margin:
            return None
        now = time.monotonic()
        for session_id in sorted(busiest.sessions):
            session = self.sessions.get(session_id)
            if (session is not None and not session.inflight and not session.handoff_began
                    and now - session.moved_s > self.move_cooldown_s
                    and idlest.kv_free_positions >= session.meta.max_positions):
                return session, idlest
        return None

    def drain_target(self, session: RoutedSession) -> WorkerInfo | None:
        """Where a session on a draining worker goes now (None: it stays for now: its worker is not draining, it
        has a request in flight or a handoff under way, or no other worker has room)."""
        source = self.workers.get(session.worker)
        if source is None or not source.draining or session.inflight or session.handoff_began:
            return None
        room = [w for w in self.serving() if w.kv_free_positions >= session.meta.max_positions]
        same = [w for w in room if w.role == source.role]
        return min(same or room, key=lambda w: (len(w.sessions), w.queue_s()), default=None)

    def drain_moves(self, names: frozenset[str]) -> Iterator[tuple[RoutedSession, WorkerInfo]]:
        """Mark the workers named `names` draining (and no others), then yield the moves their idle sessions can
        make now, one at a time (the caller hands each off before the next target is chosen)."""
        for worker in list(self.workers.values()):
            worker.draining = worker.name in names
        for worker in [w for w in list(self.workers.values()) if w.draining]:
            for session_id in sorted(worker.sessions):
                session = self.sessions.get(session_id)
                target = self.drain_target(session) if session is not None else None
                if target is not None:
                    target.kv_free_positions -= session.meta.max_positions  # reserved until its next heartbeat
                    yield session, target

    def drained(self, names: frozenset[str]) -> set[str]:
        """Of `names`, the workers with nothing left: no session, no request in flight, no KV on its way out (or
        not registered at all)."""
        leaving = {s.moved_from for s in list(self.sessions.values()) if s.handoff_began}
        return {name for name in names if (w := self.by_name(name)) is None
                or not (w.sessions or w.inflight_requests or w.identity in leaving)}

    def silent_workers(self) -> list[WorkerInfo]:
        deadline = time.monotonic() - self.worker_timeout_s
        return [w for w in list(self.workers.values()) if w.last_seen < deadline]

    def assign(self, session: RoutedSession, worker: WorkerInfo) -> None:
        old = self.workers.get(session.worker)
        if old is not None:
            old.sessions.discard(session.meta.session_id)
        session.worker = worker.identity
        worker.sessions.add(session.meta.session_id)

    def forget(self, session_id: str) -> RoutedSession | None:
        session = self.sessions.pop(session_id, None)
        if session is not None and session.worker in self.workers:
            self.workers[session.worker].sessions.discard(session_id)
        return session
