"""The discrete-event kernel of the testbed's simulator: simulated time, events, and processes.

A process is a generator. It yields a number to let that many simulated seconds pass, or a Future to
wait until someone resolves it (the value it was resolved with comes back from the yield). Events
at the same time run in the order they were scheduled, so a run is deterministic.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Generator
from typing import Any

Process = Generator[Any, Any, Any]


class Future:
    """A value some process will wait for; resolved once."""

    __slots__ = ("done", "value", "_waiters")

    def __init__(self):
        self.done = False
        self.value: Any = None
        self._waiters: list[Callable[[Any], None]] = []

    def resolve(self, value: Any = None) -> None:
        if self.done:
            raise RuntimeError("a future is resolved once")
        self.done, self.value = True, value
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter(value)

    def on_done(self, callback: Callable[[Any], None]) -> None:
        if self.done:
            callback(self.value)
        else:
            self._waiters.append(callback)


class Simulation:
    def __init__(self):
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.events_run = 0

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run `action` at simulated time `when` (never in the past)."""
        heapq.heappush(self._events, (max(when, self.now), next(self._order), action))

    def resolve_at(self, when: float, future: Future, value: Any = None) -> None:
        self.at(when, lambda: future.resolve(value))

    def spawn(self, process: Process) -> Future:
        """Start a process now; the returned future resolves with its return value."""
        finished = Future()
        self.at(self.now, lambda: self._step(process, None, finished))
        return finished

    def _step(self, process: Process, value: Any, finished: Future) -> None:
        try:
            command = process.send(value)
        except StopIteration as stop:
            finished.resolve(stop.value)
            return
        if isinstance(command, Future):
            command.on_done(lambda result: self.at(self.now, lambda: self._step(process, result, finished)))
        elif isinstance(command, (int, float)) and command >= 0:
            self.at(self.now + command, lambda: self._step(process, None, finished))
        else:
            raise TypeError(f"a process yields a delay (seconds >= 0) or a Future, not {command!r}")

    def run(self, until: float = float("inf")) -> None:
        """Run events in time order until none are left or the next is after `until`."""
        while self._events and self._events[0][0] <= until:
            self.now, _, action = heapq.heappop(self._events)
            action()
            self.events_run += 1
