"""Which worker connections the router no longer believes.

Every worker process connects under a routing id of its own: its worker id plus a random incarnation
nonce drawn at start-up (`WorkerAgent.routing_id`). So a process restarted under the same --worker-id
(by systemd, Ray, Kubernetes, or by hand) is a new connection the router has never seen, and is admitted
at once, whether or not the router has noticed the old one's death yet; the old one is then fenced:

- **lost** (silent past the timeout, or its connection gone): ZeroMQ still delivers the heartbeats it had
  queued, which must not register a dead worker again; they are ignored for `timeout_s`. A worker that is
  in fact alive keeps beating and is taken back after that.
- **superseded** (a newer process registered under its worker id): it is refused for as long as it keeps
  beating, so two live processes under one worker id never both serve (the newer one wins).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

SUPERSEDED_MEMORY = 10  # a superseded connection is remembered this many timeouts after its last message


@dataclass(slots=True)
class Fence:
    until: float  # monotonic time after which the fence lapses
    superseded: bool  # True: a newer process holds its worker id (refuse it); False: lost (ignore its stale messages)


class WorkerFence:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._fences: dict[bytes, Fence] = {}

    def lost(self, identity: bytes) -> None:
        self._fences[identity] = Fence(time.monotonic() + self.timeout_s, superseded=False)

    def superseded(self, identity: bytes) -> None:
        self._fences[identity] = Fence(time.monotonic() + SUPERSEDED_MEMORY * self.timeout_s, superseded=True)

    def check(self, identity: bytes) -> str:
        """"" (no fence: believe it), "stale" (ignore the message) or "superseded" (refuse it)."""
        fence = self._fences.get(identity)
        now = time.monotonic()
        if fence is None or (now >= fence.until and not fence.superseded):
            return ""
        if fence.superseded:  # still beating: keep refusing it
            fence.until = now + SUPERSEDED_MEMORY * self.timeout_s
            return "superseded"
        return "stale"

    def prune(self) -> None:
        """Forget fences that lapsed (a superseded connection silent for long is gone)."""
        now = time.monotonic()
        for identity in [i for i, f in self._fences.items() if now >= f.until]:
            del self._fences[identity]

    def __len__(self) -> int:
        return len(self._fences)
