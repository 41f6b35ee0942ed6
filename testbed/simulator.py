"""`hat testbed simulate`: the testbed's system as a discrete-event simulation, for scales no lab has.

What runs is the system's own logic on simulated time: each device replays its requests one at a
time (round-robin assignment, as `hat testbed run` does); its prompt goes through the prefill
executor's policy (chunks computed and sent in order, up to `max_in_flight` unanswered, replies
handled between chunks) with chunk sizes from the real ChunkPlanner fed the cost models the device
would hold; decode rounds are plain or speculative (rounds drawn from a SpeculationModel, drafting
ahead while a round is in flight when the system does, and a generation decoding plainly once GIVE_UP_ROUNDS
rounds in a row accepted nothing, as the device's draft-length chooser does); every message crosses the link model the
emulator itself uses (hat.testbed.link_shim.LinkModel); the cloud batches with the real scheduler
(sim_cloud). Costs come from sim_costs.SystemCosts. Output: the same ExperimentRecords a real run writes.

Not simulated: re-planning on drift, the OPEN/CLOSE round trips, contention between a device's own
threads, failures and recovery.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from hat.common.prefill_pipeline import PipelineCosts
from hat.device.chunk_planner import ChunkingConfig, ChunkPlanner, even_cut, fixed_cut
from hat.device.draft_length import GIVE_UP_ROUNDS

from .link_shim import LinkModel
from .records import ExperimentRecord, TimelineStep
from .scenario import DeviceGroup
from .sim_cloud import SimCloud, SimJob
from .sim_costs import DeviceCosts, SystemCosts, scaled
from .sim_kernel import Future, Simulation
from .systems import SystemConfig

MAX_IN_FLIGHT = ChunkingConfig().max_in_flight  # the prefill executor's default
TOKEN_ID_BYTES = 4  # cloud-only: one token id on the wire


@dataclass(frozen=True, slots=True)
class SimRequest:
    index: int  # in the workload
    arrival_s: float
    prompt_tokens: int
    new_tokens: int  # tokens it generates (its budget, or what a real run generated)


class SimDevice:
    def __init__(self, sim: Simulation, index: int, group: DeviceGroup, link: LinkModel, cloud: SimCloud,
                 system: SystemConfig, costs: SystemCosts, seed: int):
        self.sim, self.index, self.group, self.link, self.cloud = sim, index, group, link, cloud
        self.system, self.costs = system, costs
        self.compute: DeviceCosts | None = costs.devices.get(group.device_class)
        if self.compute is None and not costs.cloud_tokens:
            raise ValueError(f"no costs for device class {group.device_class}")
        self.schedule = group.schedule()
        self.rng = random.Random(seed)
        self.key = index.to_bytes(4, "little")
        self.fixed_chunk = 0  # the `hat` system's per-device chunk size, chosen at start-up
        self.bytes_up = self.bytes_down = 0

    def factor(self) -> float:
        """The power mode's slowdown now, relative to the class's top mode (costs are given for that mode)."""
        return self.schedule.factor_at(self.sim.now) / self.schedule.device.slowdown

    # --- the link ---------------------------------------------------------------------------------------------
    def _arrival(self, uplink: bool, size: float) -> float:
        if uplink:
            self.bytes_up += size
        else:
            self.bytes_down += size
        return self.link.schedule(self.key, uplink, int(size), self.sim.now) + self.costs.overhead_s / 2

    def send(self, tokens: int, start: int, append_only: bool, session: str) -> tuple[SimJob, Future]:
        """A FORWARD: it crosses the uplink, waits for its batch, and its reply crosses the downlink; the future
        resolves when the reply is at the device."""
        c = self.costs
        job = SimJob(session, start, tokens, append_only, c.tbt_slo_s)
        self.sim.at(self._arrival(True, c.message_bytes + c.up_bytes_per_token * tokens), lambda: self.cloud.submit(job))
        replied = Future()

        def back(_):
            down = c.down_bytes_per_token * tokens if c.down_bytes_per_token else c.up_bytes_per_token
            self.sim.resolve_at(self._arrival(False, c.message_bytes + down), replied)
        job.done.on_done(back)
        return job, replied

    # --- chunk plans ------------------------------------------------------------------------------------------
    def pipeline_costs(self) -> PipelineCosts:
        """What this device's planner would be fed now: its fitted parts, the cloud's predictor and queue, the link."""
        c, f, profile = self.costs, self.factor(), self.link.profile
        origin = self.link.origins.get(self.key, self.sim.now)
        up, down = (profile.trace.rates_at(self.sim.now - origin) if profile.trace is not None
                    else (profile.uplink_bytes_per_s, profile.downlink_bytes_per_s))
        return PipelineCosts(scaled(self.compute.planner_input, f), scaled(self.compute.planner_output, f),
                             c.cloud_predictor, self.cloud.queue_s(), up, down, profile.rtt_s + c.overhead_s,
                             c.up_bytes_per_token, c.down_bytes_per_token, c.message_bytes, self.compute.final_s * f)

    def chunks(self, tokens: int) -> list[int]:
        limit, chunking = self.costs.max_message_tokens, self.system.chunking
        if chunking == "none":
            return even_cut(tokens, math.ceil(tokens / limit))
        if chunking == "fixed" or (chunking == "per-device" and self.fixed_chunk):
            return fixed_cut(tokens, min(self.fixed_chunk or self.system.fixed_size, limit))
        return list(ChunkPlanner(ChunkingConfig()).plan(tokens, self.pipeline_costs(), limit).sizes)

    # --- one request ------------------------------------------------------------------------------------------
    def run(self, requests: list[SimRequest], mean_prompt: int, records: list):
        if self.system.chunking == "per-device":  # HAT: one size per device, planned for a typical prompt
            self.fixed_chunk = max(ChunkPlanner(ChunkingConfig()).plan(
                mean_prompt, self.pipeline_costs(), self.costs.max_message_tokens).sizes)
        for request in requests:
            if self.sim.now < request.arrival_s:
                yield request.arrival_s - self.sim.now
            started = self.sim.now
            up0, down0 = self.bytes_up, self.bytes_down
            positions = request.prompt_tokens + request.new_tokens
            yield self.cloud.admit(positions)
            steps: list[TimelineStep] = []
            session = f"d{self.index}r{request.index}"
            if self.costs.cloud_tokens:
                times, chunks = (yield from self._cloud_only(request, session)), [request.prompt_tokens]
            else:
                chunks = self.chunks(request.prompt_tokens)
                yield from self._prefill(session, chunks, steps, started)
                times = [self.sim.now]
                yield from self._decode(session, request, times, steps, started)
            self.cloud.release(positions)
            tbt = [(b - a) * 1000 for a, b in zip(times, times[1:])]
            decode = [s for s in steps if s.kind == "decode"]
            accept = sum(s.accepted + 1 for s in decode) / len(decode) if decode and self.costs.speculation else 1.0
            records.append(ExperimentRecord(
                self.system.name, request.index, self.index, self.group.device_class, request.arrival_s, started,
                self.sim.now, request.prompt_tokens, len(times), (times[0] - request.arrival_s) * 1000,
                (times[0] - started) * 1000, tbt, accept, int(self.bytes_up - up0), int(self.bytes_down - down0),
                chunks, steps))

    def _step(self, kind: str, tokens: int, sent: float, began: float, accepted: int = 0,
              drafted: int = 0) -> TimelineStep:
        """A round's timeline entry, ending now (cloud and device times are not split out)."""
        return TimelineStep(kind, tokens, (sent - began) * 1000, (self.sim.now - sent) * 1000, 0.0, 0.0,
                            accepted, drafted)

    def _prefill(self, session: str, sizes: list[int], steps: list, began: float):
        """The prefill executor's policy (hat.device.prefill), as hat.common.prefill_pipeline models it."""
        compute, in_flight, position = self.compute, deque(), 0

        def complete():
            start, count, sent, replied = in_flight.popleft()
            yield replied
            steps.append(self._step("prefill", count, sent, began))
            if self.costs.down_bytes_per_token:
                yield compute.output.predict(count, start) * self.factor()

        for count in sizes:
            if len(in_flight) >= MAX_IN_FLIGHT:
                yield from complete()
            yield 0.0  # replies due at this very instant are in before the device looks (as "arrived by now")
            while in_flight and in_flight[0][3].done:
                yield from complete()
            yield compute.input.predict(count, position) * self.factor()
            in_flight.append((position, count, self.sim.now, self.send(count, position, True, session)[1]))
            position += count
        while in_flight:
            yield from complete()
        yield compute.final_s * self.factor()

    def _decode(self, session: str, request: SimRequest, times: list[float], steps: list, began: float):
        compute, speculation = self.compute, self.costs.speculation
        position, carried, prefill_steps = request.prompt_tokens, 0, len(steps)
        fruitless = 0  # rounds in a row that accepted no draft token: GIVE_UP_ROUNDS of them end speculation
        while len(times) < request.new_tokens:
            remaining = request.new_tokens - len(times)
            drafting = speculation is not None and fruitless < GIVE_UP_ROUNDS  # (the device's DraftLengthChooser)
            drafted, accepted, kept = speculation.draw(self.rng, remaining - 1, request.index, len(steps) - prefill_steps) if drafting else (0, 0, 0)
            fresh = drafted - min(carried, drafted) if speculation else 1
            if fresh:
                yield compute.before_round.predict(fresh) * self.factor()
            elif drafting:  # a speculative round drafting nothing new still runs the adapter and the length choice
                yield compute.idle_round_s * self.factor()
            fruitless = 0 if accepted else fruitless + 1
            sent = self.sim.now
            yield self.send(drafted + 1, position, False, session)[1]
            round_s = self.sim.now - sent
            steps.append(self._step("decode", drafted + 1, sent, began, accepted, drafted))
            carried = 0
            if self.system.parallel_draft and accepted == drafted and kept and compute.draft_token_s > 0:
                carried = min(kept, int(round_s / (compute.draft_token_s * self.factor())))
            yield compute.after_round.predict(drafted + 1) * self.factor()
            new = min(accepted + 1, remaining)
            times.extend([self.sim.now] * new)
            position += new

    def _cloud_only(self, request: SimRequest, session: str):
        """Cloud-only: the prompt's token ids go up once; the cloud generates on its own and streams each token."""
        c, times = self.costs, []
        arrived = Future()
        self.sim.resolve_at(self._arrival(True, c.message_bytes + TOKEN_ID_BYTES * request.prompt_tokens), arrived)
        yield arrived
        position = 0
        for count in fixed_cut(request.prompt_tokens, c.max_batch_tokens):  # the prompt within the token budget
            job = SimJob(session, position, count, True, c.tbt_slo_s)
            self.cloud.submit(job)
            yield job.done
            position += count
        times.append(self._arrival(False, c.message_bytes + TOKEN_ID_BYTES))
        for _ in range(request.new_tokens - 1):
            job = SimJob(session, position, 1, False, c.tbt_slo_s)
            self.cloud.submit(job)
            yield job.done
            times.append(self._arrival(False, c.message_bytes + TOKEN_ID_BYTES))
            position += 1
        latest = max(times)
        if latest > self.sim.now:
            yield latest - self.sim.now
        return times
