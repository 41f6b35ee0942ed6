"""The cloud's sessions: one middle-part KV cache per device generation, with idle expiry."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from hat.common.kv_cache import KVCache
from hat.common.model_part import ModelPart
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError

from .kv_budget import KVBudget


@dataclass(slots=True)
class CloudSession:
    session_id: str  # chosen by the device
    device_id: str  # registered device that opened it
    owner: bytes  # ZeroMQ routing id of the connection that opened it; only it may use the session
    cache: KVCache  # middle-layer keys and values
    last_active: float  # monotonic time of the last message
    opened_s: float = 0.0  # monotonic time its OPEN arrived
    prompt_reply_s: float = 0.0  # when its latest prompt chunk's reply went out
    round_reply_s: float = 0.0  # when its latest decode or verification reply went out (0 = none yet)
    ttft_slo_s: float = 0.0  # the request's time-to-first-token target
    tbt_slo_s: float = 0.0  # the request's time-between-rounds target (batches with its rounds are kept within it)


class SessionStore:
    def __init__(self, part: ModelPart, max_sessions: int, idle_timeout_s: float, budget: KVBudget,
                 clock=time.monotonic):
        self.part = part
        self.budget = budget
        self._max_sessions = max_sessions
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, CloudSession] = {}
        self._lock = threading.Lock()
        self.expired_total = 0

    def open(self, session_id: str, device_id: str, owner: bytes, max_positions: int = 0, ttft_slo_s: float = 0.0,
             tbt_slo_s: float = 0.0, arrived_s: float | None = None) -> CloudSession:
        """Create the session with an empty cache for up to `max_positions` (0 = the context), its KV blocks
        reserved (re-opening one's own session starts it afresh)."""
        if not session_id:
            raise WireError(pb.MALFORMED, "OPEN needs a session id")
        context = self.part.spec.max_context
        positions = min(max_positions, context) if max_positions else context
        with self._lock:
            existing = self._sessions.get(session_id)
            if existing is not None and existing.owner != owner:
                raise WireError(pb.SESSION_EXISTS, f"session {session_id!r} belongs to another connection")
            if existing is None and len(self._sessions) >= self._max_sessions:
                raise WireError(pb.OVERLOADED, f"the cloud holds its limit of {self._max_sessions} sessions; retry later",
                                retry_after_ms=self.budget.retry_after_ms)
            self.budget.reserve(session_id, positions)
            now = self._clock()
            session = CloudSession(session_id, device_id, owner, self.part.new_cache(positions, preallocate=True),
                                   now, opened_s=now if arrived_s is None else arrived_s, ttft_slo_s=ttft_slo_s,
                                   tbt_slo_s=tbt_slo_s)
            self._sessions[session_id] = session
            return session

    def sessions_of(self, device_id: str) -> int:
        """Open sessions of one device id."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.device_id == device_id)

    def holds(self, session_id: str, owner: bytes) -> bool:
        """Whether `owner` already has this session (an OPEN of it is a re-open, not a new session)."""
        with self._lock:
            session = self._sessions.get(session_id)
            return session is not None and session.owner == owner

    def get(self, session_id: str, owner: bytes) -> CloudSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise WireError(pb.UNKNOWN_SESSION, f"unknown session {session_id!r} (never opened, closed, or expired)")
        session.last_active = self._clock()
        return session

    def close(self, session_id: str, owner: bytes) -> None:
        self.get(session_id, owner)
        with self._lock:
            del self._sessions[session_id]
            self.budget.release(session_id)

    def peek(self, session_id: str) -> CloudSession | None:
        """The session, whoever owns it (for the cloud's own use, never a device's request)."""
        with self._lock:
            return self._sessions.get(session_id)

    def take(self, session_id: str) -> CloudSession | None:
        """Remove the session and release its KV blocks; the caller keeps the session (its cache) to hand it off."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            self.budget.release(session_id)
        return session

    def discard(self, session_id: str) -> None:
        self.take(session_id)

    def clear(self) -> list[str]:
        """Drop every session; their ids."""
        with self._lock:
            gone = list(self._sessions)
            for session_id in gone:
                self.budget.release(session_id)
            self._sessions.clear()
        return gone

    def expire_idle(self) -> list[str]:
        deadline = self._clock() - self._idle_timeout_s
        with self._lock:
            gone = [sid for sid, s in self._sessions.items() if s.last_active < deadline]
            for sid in gone:
                del self._sessions[sid]
                self.budget.release(sid)
            self.expired_total += len(gone)
        return gone

    def __len__(self) -> int:
        return len(self._sessions)

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(s.cache.nbytes for s in self._sessions.values())
