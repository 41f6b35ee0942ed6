"""The chunk planner's short search (hat.device.chunk_planner): simulations that stop once a cut falls behind the
best so far, and no search on shared cores where no cut can win the margin. The oracle is the full search: the
same planner with every simulation run to its end and the shortcut disabled; both must choose the same cut."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest

import hat.device.chunk_planner as chunk_planner
from hat.common.cost_fit import LinearCost
from hat.common.prefill_pipeline import PipelineCosts, simulate_prefill
from hat.device.chunk_planner import ChunkingConfig, ChunkPlan, ChunkPlanner


class FullSearch(ChunkPlanner):
    """The oracle: every candidate simulated to its end."""

    def evaluate(self, sizes, costs, start, in_flight=(), beat=None) -> ChunkPlan:
        return super().evaluate(sizes, costs, start, in_flight)


def random_costs(rng: random.Random) -> PipelineCosts:
    def cost(base, token, pair):
        return LinearCost(rng.uniform(0, base), rng.uniform(1e-7, token), rng.uniform(0, pair))

    shared = rng.random() < 0.5
    rate = 10 ** rng.uniform(9, 12) if shared and rng.random() < 0.7 else 10 ** rng.uniform(5, 9)  # loopback or not
    return PipelineCosts(
        device_input=cost(3e-3, rng.choice([1e-5, 1e-4, 1e-3]), 1e-8),
        device_output=cost(3e-3, rng.choice([1e-5, 1e-4]), 1e-8),
        cloud=cost(5e-3, rng.choice([5e-5, 5e-4]), 1e-9),
        cloud_queue_s=rng.choice([0.0, rng.uniform(0, 5e-3)]),
        uplink_bytes_per_s=rate, downlink_bytes_per_s=rate * rng.uniform(0.5, 2),
        rtt_s=rng.choice([rng.uniform(0, 2e-4), rng.uniform(0, 0.1)]),
        up_bytes_per_token=rng.choice([1024, 4096]), down_bytes_per_token=rng.choice([0, 1024, 4096]),
        final_s=rng.uniform(0, 0.01), shared_compute=shared,
        chunk_overhead_s=rng.choice([0.0, rng.uniform(0, 2e-3)]), prompt_overhead_s=rng.uniform(0, 5e-3))


def test_the_short_search_chooses_what_the_full_search_does(monkeypatch):
    rng = random.Random(7)
    cases, shortcuts = [], 0
    for _ in range(160):
        costs = random_costs(rng)
        cases.append((rng.randint(1, 3000), rng.choice([256, 1024, 4096]), costs, rng.randint(1, 8),
                      rng.choice([0, rng.randint(1, 1500)])))
    short = []
    for tokens, max_chunk, costs, in_flight, start in cases:
        planner = ChunkPlanner(ChunkingConfig(max_in_flight=in_flight))
        short.append(planner.plan(tokens, costs, max_chunk, start))
        whole = planner.evaluate([tokens], costs, start)
        shortcuts += tokens <= max_chunk and costs.shared_compute and chunk_planner.hideable_s(tokens, costs) * (
            1 + chunk_planner.WHOLE_PROMPT_MARGIN) <= chunk_planner.WHOLE_PROMPT_MARGIN * whole.predicted_s
    monkeypatch.setattr(chunk_planner, "hideable_s", lambda tokens, costs: math.inf)  # the oracle has no shortcut
    for (tokens, max_chunk, costs, in_flight, start), got in zip(cases, short):
        want = FullSearch(ChunkingConfig(max_in_flight=in_flight)).plan(tokens, costs, max_chunk, start)
        assert got.sizes == want.sizes, (tokens, max_chunk, costs)
        assert got.predicted_s == pytest.approx(want.predicted_s, rel=1e-12)
    assert shortcuts >= 10  # the shared-cores shortcut was exercised, not only the bounded simulations


def test_a_simulation_given_a_limit_is_exact_or_infinite():
    rng = random.Random(3)
    for _ in range(300):
        costs = random_costs(rng)
        tokens = rng.randint(1, 2000)
        sizes = chunk_planner.even_cut(tokens, rng.randint(1, min(tokens, 40)))
        in_flight = rng.randint(1, 8)
        true = simulate_prefill(sizes, costs, in_flight).ttft_s
        assert simulate_prefill(sizes, costs, in_flight, give_up_after=true * (1 + 1e-9)).ttft_s == true
        below = simulate_prefill(sizes, costs, in_flight, give_up_after=true * rng.uniform(0.2, 0.999)).ttft_s
        assert below in (math.inf, true)


def test_on_shared_cores_a_fast_link_leaves_the_prompt_whole_after_one_simulation(monkeypatch):
    part = LinearCost(2e-3, 1e-4, 1e-9)
    costs = PipelineCosts(device_input=part, device_output=part, cloud=part, cloud_queue_s=0.0,
                          uplink_bytes_per_s=1e9, downlink_bytes_per_s=1e9, rtt_s=1e-4, up_bytes_per_token=2304,
                          down_bytes_per_token=2304, shared_compute=True)
    calls = []
    real = chunk_planner.simulate_prefill
    monkeypatch.setattr(chunk_planner, "simulate_prefill", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    plan = ChunkPlanner().plan(1024, costs, 4096)
    assert plan.sizes == (1024,) and calls == [[1024]]
    calls.clear()
    slow_link = dataclasses.replace(costs, uplink_bytes_per_s=2e7, downlink_bytes_per_s=2e7)  # link time to hide
    ChunkPlanner().plan(1024, slow_link, 4096)
    assert len(calls) > 10
