"""The pipelined-prefill cost model (hat.common.prefill_pipeline): simulate_prefill against an independent
discrete-event simulation of the same device policy and FIFO stages, closed forms for simple cases, and
prefill_lower_bound."""
from __future__ import annotations

import heapq
import itertools
import random
from collections import deque

import pytest

from hat.common.cost_fit import LinearCost
from hat.common.prefill_pipeline import PipelineCosts, prefill_lower_bound, simulate_prefill

# --------------------------------------------------------------------------------------- the oracle

_NETWORK, _DEVICE = 0, 1  # at equal times, arrivals are seen before the device looks for them


class _EventSimulation:
    """A brute-force discrete-event simulation of one prefill.

    The network is a chain of stages: FIFO servers (uplink, cloud, downlink) with one job in service at a
    time and a queue, and pure delays (half a round trip each way). The device is a coroutine that yields
    what it does next: ("busy", seconds), ("send", chunk) or ("wait", chunk); the engine pops events off a
    heap in time order and resumes it."""

    def __init__(self, sizes: list[int], costs: PipelineCosts, max_in_flight: int, start: int):
        self.sizes, self.costs, self.max_in_flight = sizes, costs, max_in_flight
        self.positions = [start + sum(sizes[:i]) for i in range(len(sizes))]
        self.heap: list = []
        self.counter = itertools.count()
        self.clock = 0.0
        self.arrived = [False] * len(sizes)
        self.waiting_for: int | None = None
        self.sent = [None] * len(sizes)
        self.done = [None] * len(sizes)
        half = costs.rtt_s / 2
        # each stage: ("server", service time of chunk i) or ("delay", seconds)
        self.stages = [
            ("server", lambda i: costs.up_s(sizes[i])),
            ("delay", half),
            # a pipelined cloud: one server per stage, each an even share; the queue wait is stage 0's
            ("server", lambda i: costs.cloud_queue_s + costs.cloud.predict(sizes[i], self.positions[i])
             / costs.cloud_stages),
            *[("server", lambda i: costs.cloud.predict(sizes[i], self.positions[i]) / costs.cloud_stages)
              for _ in range(costs.cloud_stages - 1)],
            ("server", lambda i: costs.down_s(sizes[i])),
            ("delay", half),
        ]
        self.queues = [deque() for _ in self.stages]
        self.busy = [False] * len(self.stages)

    # ---- engine
    def at(self, time: float, priority: int, action) -> None:
        heapq.heappush(self.heap, (time, priority, next(self.counter), action))

    def run(self) -> float:
        self.device = self.program()
        self.at(0.0, _DEVICE, self.resume)
        while self.heap:
            time, _, _, action = heapq.heappop(self.heap)
            assert time >= self.clock
            self.clock = time
            action()
        assert all(d is not None for d in self.done)
        return self.clock + self.costs.final_s

    # ---- network
    def enter(self, stage: int, chunk: int) -> None:
        if stage == len(self.stages):  # the reply is at the device
            self.arrived[chunk] = True
            if self.waiting_for == chunk:
                self.waiting_for = None
                self.at(self.clock, _DEVICE, self.resume)
            return
        kind, what = self.stages[stage]
        if kind == "delay":
            self.at(self.clock + what, _NETWORK, lambda: self.enter(stage + 1, chunk))
            return
        self.queues[stage].append(chunk)
        if not self.busy[stage]:
            self.serve(stage)

    def serve(self, stage: int) -> None:
        chunk = self.queues[stage].popleft()
        self.busy[stage] = True

        def finish():
            self.busy[stage] = False
            if self.queues[stage]:
                self.serve(stage)
            self.enter(stage + 1, chunk)

        self.at(self.clock + self.stages[stage][1](chunk), _NETWORK, finish)

    # ---- device
    def resume(self) -> None:
        try:
            request = next(self.device)
        except StopIteration:
            return
        what, value = request
        if what == "busy":
            self.at(self.clock + value, _DEVICE, self.resume)
        elif what == "send":
            self.sent[value] = self.clock
            self.enter(0, value)
            self.at(self.clock, _DEVICE, self.resume)
        elif what == "wait":
            if self.arrived[value]:
                self.at(self.clock, _DEVICE, self.resume)
            else:
                self.waiting_for = value

    def handle(self, chunk: int):
        yield "wait", chunk
        yield "busy", self.costs.device_output.predict(self.sizes[chunk], self.positions[chunk])
        self.done[chunk] = self.clock

    def program(self):
        outstanding: deque[int] = deque()  # sent, reply not yet handled, oldest first
        for i, n in enumerate(self.sizes):
            if len(outstanding) >= self.max_in_flight:
                yield from self.handle(outstanding.popleft())
            while outstanding and self.arrived[outstanding[0]]:
                yield from self.handle(outstanding.popleft())
            yield "busy", self.costs.device_input.predict(n, self.positions[i])
            yield "send", i
            outstanding.append(i)
        while outstanding:
            yield from self.handle(outstanding.popleft())


def oracle(sizes: list[int], costs: PipelineCosts, max_in_flight: int, start: int = 0):
    sim = _EventSimulation(sizes, costs, max_in_flight, start)
    ttft = sim.run()
    return ttft, sim.sent, sim.done


# --------------------------------------------------------------------------------------- helpers


def random_costs(rng: random.Random) -> PipelineCosts:
    def cost(base, token, pair):
        return LinearCost(rng.uniform(0.1, 1) * base, rng.uniform(0, 1) * token, rng.uniform(0, 1) * pair)

    return PipelineCosts(
        device_input=cost(2e-3, rng.choice([1e-5, 1e-4, 1e-3]), 1e-8),
        device_output=cost(2e-3, rng.choice([1e-5, 1e-4, 1e-3]), 1e-8),
        cloud=cost(5e-3, rng.choice([1e-6, 1e-5, 1e-4]), 1e-9),
        cloud_queue_s=rng.choice([0.0, rng.uniform(0, 5e-3)]),
        uplink_bytes_per_s=10 ** rng.uniform(5, 9),
        downlink_bytes_per_s=10 ** rng.uniform(5, 9),
        rtt_s=rng.choice([0.0, rng.uniform(0, 0.1)]),
        up_bytes_per_token=rng.choice([1024, 4096, 8192]),
        down_bytes_per_token=rng.choice([0, 1024, 4096]),
        message_bytes=rng.uniform(16, 256),
        final_s=rng.uniform(0, 0.01),
        cloud_stages=rng.choice([1, 1, 2, 3, 4]),
    )


def random_cut(rng: random.Random, tokens: int) -> list[int]:
    pieces = rng.randint(1, min(tokens, 40))
    cuts = sorted(rng.sample(range(1, tokens), pieces - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]


def simple_costs(**overrides) -> PipelineCosts:
    fields = dict(device_input=LinearCost(1e-3, 2e-5, 1e-9), device_output=LinearCost(5e-4, 1e-5, 2e-9),
                  cloud=LinearCost(3e-3, 4e-6, 3e-10), cloud_queue_s=2e-3, uplink_bytes_per_s=20e6,
                  downlink_bytes_per_s=40e6, rtt_s=0.03, up_bytes_per_token=4096, down_bytes_per_token=4096,
                  message_bytes=64.0, final_s=4e-3)
    fields.update(overrides)
    return PipelineCosts(**fields)


def stage_sum(costs: PipelineCosts, n: int, position: int) -> float:
    """One chunk through every stage with nothing ahead of it."""
    return (costs.device_input.predict(n, position) + costs.up_s(n) + costs.rtt_s + costs.cloud_queue_s
            + costs.cloud.predict(n, position) + costs.down_s(n) + costs.device_output.predict(n, position))


# --------------------------------------------------------------------------------------- tests


def test_oracle_agrees_with_simulate_prefill_on_random_cases():
    """simulate_prefill's TTFT, send and done times equal the event simulation's (to 1e-9) for random costs,
    random cuts, starts and max_in_flight 1..8."""
    rng = random.Random(1234)
    interleaved = 0
    for _ in range(400):
        costs = random_costs(rng)
        tokens = rng.randint(1, 3000)
        sizes = random_cut(rng, tokens)
        max_in_flight = rng.randint(1, 8)
        start = rng.choice([0, rng.randint(1, 2000)])
        got = simulate_prefill(sizes, costs, max_in_flight, start)
        ttft, sent, done = oracle(sizes, costs, max_in_flight, start)
        assert got.ttft_s == pytest.approx(ttft, rel=1e-9, abs=1e-12)
        assert got.sent_s == pytest.approx(sent, rel=1e-9, abs=1e-12)
        assert got.done_s == pytest.approx(done, rel=1e-9, abs=1e-12)
        # cases where some reply is handled before the last chunk is sent, i.e. the policy's interleaving matters
        interleaved += any(d < got.sent_s[-1] for d in got.done_s)
    assert interleaved > 40  # the random cases exercise the interleaving, not only send-all-then-drain


def test_single_chunk_is_the_sum_of_its_stages():
    """One chunk: TTFT = input + uplink + rtt + queue + cloud + downlink + output + final, exactly."""
    costs = simple_costs()
    for n, start in ((1, 0), (300, 0), (512, 1000)):
        result = simulate_prefill([n], costs, max_in_flight=4, start=start)
        expected = stage_sum(costs, n, start) + costs.final_s
        assert result.ttft_s == pytest.approx(expected, rel=1e-12)
        assert result.sent_s == pytest.approx((costs.device_input.predict(n, start),))
        assert result.done_s == pytest.approx((expected - costs.final_s,))


def test_one_in_flight_is_fully_serial():
    """max_in_flight=1: every chunk makes its whole round trip before the next is computed."""
    costs = simple_costs()
    sizes = [100, 37, 250, 8]
    positions = [0, 100, 137, 387]
    expected = sum(stage_sum(costs, n, p) for n, p in zip(sizes, positions)) + costs.final_s
    assert simulate_prefill(sizes, costs, max_in_flight=1).ttft_s == pytest.approx(expected, rel=1e-12)


def test_device_sends_back_to_back_while_no_reply_has_come():
    """With a round trip longer than all the input work, chunks are sent as fast as the device computes them."""
    costs = simple_costs(rtt_s=10.0)
    sizes = [64, 128, 256, 512]
    result = simulate_prefill(sizes, costs, max_in_flight=8)
    position, clock = 0, 0.0
    for n, sent in zip(sizes, result.sent_s):
        clock += costs.device_input.predict(n, position)
        position += n
        assert sent == pytest.approx(clock, rel=1e-12)


def test_timeline_is_ordered():
    """Sends and completions are in chunk order, each completion a round trip or more after its send, and
    the TTFT is the last completion plus the final step."""
    rng = random.Random(7)
    for _ in range(100):
        costs = random_costs(rng)
        sizes = random_cut(rng, rng.randint(2, 2000))
        result = simulate_prefill(sizes, costs, rng.randint(1, 8))
        assert list(result.sent_s) == sorted(result.sent_s)
        assert list(result.done_s) == sorted(result.done_s)
        assert all(d >= s + costs.rtt_s for s, d in zip(result.sent_s, result.done_s))
        assert result.ttft_s == pytest.approx(result.done_s[-1] + costs.final_s)


def test_zero_down_bytes_per_token_returns_one_row_per_reply():
    """down_bytes_per_token=0: a reply is the header plus one row of hidden state, whatever the chunk size."""
    costs = simple_costs(down_bytes_per_token=0.0, downlink_bytes_per_s=1e6)
    one_row = (costs.message_bytes + costs.up_bytes_per_token) / costs.downlink_bytes_per_s
    for n in (1, 10, 1000):
        assert costs.down_s(n) == pytest.approx(one_row)
    full = simple_costs(downlink_bytes_per_s=1e6)
    assert full.down_s(1000) == pytest.approx((64 + 4096 * 1000) / 1e6)
    # in the simulation too: a single chunk pays one row's downlink time
    result = simulate_prefill([1000], costs, max_in_flight=1)
    assert result.ttft_s == pytest.approx(stage_sum(costs, 1000, 0) + costs.final_s)


def test_lower_bound_holds_when_the_device_is_not_the_bottleneck():
    """simulate_prefill never beats prefill_lower_bound on random cases whose busiest resource is the link
    or the cloud."""
    rng = random.Random(99)
    checked = 0
    for _ in range(600):
        costs = random_costs(rng)
        tokens = rng.randint(1, 3000)
        device = sum(c.predict(tokens) - c.base_s for c in (costs.device_input, costs.device_output))
        up = costs.up_bytes_per_token * tokens / costs.uplink_bytes_per_s
        down = costs.down_bytes_per_token * tokens / costs.downlink_bytes_per_s
        cloud = costs.cloud.predict(tokens) - costs.cloud.base_s
        if device >= max(up, down, cloud):
            continue
        checked += 1
        sizes = random_cut(rng, tokens)
        bound = prefill_lower_bound(tokens, costs)
        assert simulate_prefill(sizes, costs, rng.randint(1, 8)).ttft_s >= bound * (1 - 1e-12)
    assert checked > 100


def test_lower_bound_is_reached_by_nothing_for_a_single_chunk():
    """A single chunk (no pipelining to exploit) is never faster than the bound."""
    rng = random.Random(5)
    for _ in range(200):
        costs = random_costs(rng)
        tokens = rng.randint(1, 3000)
        start = rng.randint(0, 1000)
        assert simulate_prefill([tokens], costs, 1, start).ttft_s >= prefill_lower_bound(tokens, costs, start)


def test_lower_bound_holds_on_random_cases():
    """simulate_prefill's TTFT is never below prefill_lower_bound, for any cut, on random costs."""
    rng = random.Random(99)
    for _ in range(1000):
        costs = random_costs(rng)
        tokens = rng.randint(1, 3000)
        sizes = random_cut(rng, tokens)
        max_in_flight = rng.randint(1, 8)
        assert simulate_prefill(sizes, costs, max_in_flight).ttft_s >= prefill_lower_bound(tokens, costs) * (1 - 1e-12)


def test_lower_bound_device_bound_counterexample():
    """Two 100-token chunks, 1 ms/token on the device each way, a near-instant link and cloud and a 50 ms round
    trip: the device computes chunk 2's input while chunk 1 travels, then both output parts back to back,
    TTFT 0.4 s; the bound claims 0.2 + 0.2 + 0.05 = 0.45 s."""
    device = LinearCost(0.0, 1e-3, 0.0)
    costs = PipelineCosts(device_input=device, device_output=device, cloud=LinearCost(0.0, 0.0, 0.0),
                          cloud_queue_s=0.0, uplink_bytes_per_s=1e15, downlink_bytes_per_s=1e15, rtt_s=0.05,
                          up_bytes_per_token=1.0, down_bytes_per_token=1.0, message_bytes=0.0)
    ttft = simulate_prefill([100, 100], costs, max_in_flight=2).ttft_s
    assert ttft == pytest.approx(0.4)
    assert oracle([100, 100], costs, 2)[0] == pytest.approx(0.4)
    assert ttft >= prefill_lower_bound(200, costs)  # fails: 0.4 < 0.45
