"""KV memory of the cloud's sessions, accounted in blocks against a budget (admission control).

A session reserves, at OPEN, blocks for the most positions it says it will hold (prompt + new tokens,
capped at the context); its cache is allocated at that size once, so a running session never runs out
of memory and never waits. An OPEN that does not fit is refused with OVERLOADED and a retry hint: the
device waits and retries; running sessions finish undisturbed and free their blocks at CLOSE or expiry.
"""
from __future__ import annotations

import math
import threading

from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError


class KVBudget:
    def __init__(self, bytes_per_position: int, budget_bytes: int, block_tokens: int = 16, retry_after_ms: int = 250):
        if block_tokens < 1 or bytes_per_position < 1:
            raise ValueError("block_tokens and bytes_per_position must be positive")
        self.block_tokens = block_tokens
        self.block_bytes = bytes_per_position * block_tokens
        self.total_blocks = budget_bytes // self.block_bytes
        self.retry_after_ms = retry_after_ms
        self._held: dict[str, int] = {}  # session id -> blocks
        self._lock = threading.Lock()  # the data plane reserves, the control plane and metrics read
        self.refusals = 0  # OPENs refused for want of memory

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_tokens)

    def reserve(self, session_id: str, positions: int) -> None:
        """Hold blocks for `positions` under `session_id` (replacing what it held), or raise OVERLOADED."""
        needed = self.blocks_for(positions)
        with self._lock:
            free = self.total_blocks - sum(self._held.values()) + self._held.get(session_id, 0)
            if needed > free:
                self.refusals += 1
                never = needed > self.total_blocks
                raise WireError(pb.OVERLOADED, (
                    f"KV memory: the session needs {needed} blocks ({positions} positions) and "
                    + (f"the cloud's whole budget is {self.total_blocks}: ask for fewer positions"
                       if never else f"{free} of {self.total_blocks} are free; retry in {self.retry_after_ms} ms")),
                    retry_after_ms=0 if never else self.retry_after_ms)
            self._held[session_id] = needed

    def release(self, session_id: str) -> None:
        with self._lock:
            self._held.pop(session_id, None)

    @property
    def used_blocks(self) -> int:
        with self._lock:
            return sum(self._held.values())
