"""Workers being drained before they stop: the hand-over between whoever retires workers (the Ray pool's
scale-down, on its own thread) and the router's loop, which owns the tables.

The retiring side calls `drain(name)`, waits until `is_drained(name)` (the router moved every session off
the worker by the usual KV handoff and nothing of it is in flight or on its way), stops the process, then
calls `stopped(name)`. The router reads `names()` and `take_stopped()` at each housekeeping round and
publishes the drained ones.
"""
from __future__ import annotations

import threading


class WorkerDrain:
    def __init__(self):
        self._lock = threading.Lock()
        self._draining: set[str] = set()  # worker names asked to drain
        self._stopped: set[str] = set()  # drained workers since stopped, for the router to forget
        self._drained: set[str] = set()  # draining workers the router found empty at its latest round

    # the retiring side (any thread)

    def drain(self, name: str) -> None:
        """Take no new sessions on worker `name` and move its sessions off."""
        with self._lock:
            self._draining.add(name)

    def is_drained(self, name: str) -> bool:
        with self._lock:
            return name in self._drained

    def cancel(self, name: str) -> None:
        """Worker `name` is wanted again after all: it takes new sessions again."""
        with self._lock:
            self._draining.discard(name)
            self._drained.discard(name)

    def stopped(self, name: str) -> None:
        """Worker `name` was stopped: the router drops it (its connection is not a lost worker's)."""
        with self._lock:
            self._draining.discard(name)
            self._drained.discard(name)
            self._stopped.add(name)

    # the router's loop

    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._draining)

    def take_stopped(self) -> set[str]:
        with self._lock:
            stopped, self._stopped = self._stopped, set()
            return stopped

    def publish(self, drained: set[str]) -> None:
        with self._lock:
            self._drained = drained & self._draining
