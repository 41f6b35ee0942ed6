"""The simulated cloud: one middle part serving every device, batching with the system's own scheduler.

Each FORWARD becomes a SimJob; whenever the engine is free it forms the next batch with
`hat.cloud.scheduler.form_batch` (one job per session, decode rounds first, token budget, the SLO
check against the cloud's published predictor) and runs it for the batch latency of the cost model.
KV room is reserved per session at OPEN, as the real cloud's admission does; a session that does not
fit waits, first come first served, until room frees (the real device retries on OVERLOADED).
Not modelled: pipeline-parallel stages and disaggregated prefill/decode workers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hat.cloud.scheduler import form_batch

from .sim_costs import SystemCosts, batch_seconds
from .sim_kernel import Future, Simulation


@dataclass(slots=True)
class SimJob:
    """One FORWARD, with what the scheduler reads of a hat.cloud.middle_worker.ForwardJob."""
    session_key: str  # its session
    start: int  # first position
    tokens: int  # positions
    append_only: bool  # a prompt chunk (True) or a decode / verification round
    tbt_slo_s: float  # its session's time-between-rounds target
    done: Future = field(default_factory=Future)  # resolved when its batch has run, with the batch's seconds


class SimCloud:
    def __init__(self, sim: Simulation, costs: SystemCosts):
        self.sim, self.costs = sim, costs
        self.pending: deque[SimJob] = deque()
        self.busy = False
        self.kv_free = costs.kv_positions or float("inf")
        self._admissions: deque[tuple[int, Future]] = deque()  # (positions, granted) waiting for KV room
        self.batches = 0
        self.busy_s = 0.0
        self.largest_batch = 0  # sessions in the largest batch

    def submit(self, job: SimJob) -> None:
        self.pending.append(job)
        if not self.busy:  # the batch forms once everything arriving at this instant is in
            self.busy = True
            self.sim.at(self.sim.now, self._next_batch)

    def queue_s(self) -> float:
        """The predicted time of the work waiting now (what the cloud publishes as queueing)."""
        if not self.pending:
            return 0.0
        return batch_seconds(self.costs.cloud_predictor, [(j.tokens, j.start) for j in self.pending])

    def _next_batch(self) -> None:
        batch, self.pending = form_batch(self.pending, self.costs.max_batch_tokens, self.costs.cloud_predictor)
        if not batch:
            self.busy = False
            return
        self.busy = True
        seconds = batch_seconds(self.costs.cloud, [(j.tokens, j.start) for j in batch])
        self.batches += 1
        self.busy_s += seconds
        self.largest_batch = max(self.largest_batch, len(batch))
        self.sim.at(self.sim.now + seconds, lambda: self._finish(batch, seconds))

    def _finish(self, batch: list[SimJob], seconds: float) -> None:
        for job in batch:
            job.done.resolve(seconds)
        # the next batch forms after what the replies set off at this instant (a cloud-only session's next step)
        self.sim.at(self.sim.now, self._next_batch)

    def admit(self, positions: int) -> Future:
        """Reserve KV for a session of `positions`; resolves when granted."""
        granted = Future()
        if positions > (self.costs.kv_positions or float("inf")):
            raise ValueError(f"a session of {positions} positions can never fit the cloud's {self.costs.kv_positions}")
        if not self._admissions and positions <= self.kv_free:
            self.kv_free -= positions
            granted.resolve()
        else:
            self._admissions.append((positions, granted))
        return granted

    def release(self, positions: int) -> None:
        self.kv_free += positions
        while self._admissions and self._admissions[0][0] <= self.kv_free:
            need, granted = self._admissions.popleft()
            self.kv_free -= need
            granted.resolve()
