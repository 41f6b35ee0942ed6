"""The prompt chunk planner (hat.device.chunk_planner): cut helpers, ChunkingConfig validation, and the plans of
the "none", "fixed" and "adaptive" modes checked against the pipeline cost model they optimise."""
from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest

from hat.common.cost_fit import LinearCost
from hat.common.prefill_pipeline import PipelineCosts, simulate_prefill
from hat.device.chunk_planner import ChunkingConfig, ChunkPlanner, even_cut, fixed_cut, ramp_cut

MAX_CHUNKS = [64, 128, 256, 512, 1024, 4096]


def random_costs(rng: random.Random) -> PipelineCosts:
    def cost(base, token, pair):
        return LinearCost(rng.uniform(0, base), rng.uniform(0, token), rng.uniform(0, pair))

    return PipelineCosts(
        device_input=cost(3e-3, rng.choice([1e-5, 1e-4, 1e-3]), 1e-8),
        device_output=cost(3e-3, rng.choice([0.0, 1e-5, 1e-4, 1e-3]), 1e-8),
        cloud=cost(5e-3, 5e-5, 1e-9),
        cloud_queue_s=rng.choice([0.0, rng.uniform(0, 5e-3)]),
        uplink_bytes_per_s=10 ** rng.uniform(5, 9),
        downlink_bytes_per_s=10 ** rng.uniform(5, 9),
        rtt_s=rng.uniform(0, 0.1),
        up_bytes_per_token=rng.choice([1024, 4096, 8192]),
        down_bytes_per_token=rng.choice([0, 1024, 4096]),
        final_s=rng.uniform(0, 0.01),
    )


def random_cases(seed: int, count: int):
    """(tokens, max_chunk, costs, max_in_flight, start) for random prompts and cost settings."""
    rng = random.Random(seed)
    for _ in range(count):
        yield (rng.randint(1, 4096), rng.choice(MAX_CHUNKS), random_costs(rng), rng.randint(1, 8),
               rng.choice([0, rng.randint(1, 2000)]))


def ttft(sizes, costs: PipelineCosts, max_in_flight: int, start: int = 0) -> float:
    return simulate_prefill(list(sizes), costs, max_in_flight, start).ttft_s


def uniform_costs(part: LinearCost, up: float, down: float, rtt: float = 0.02,
                  down_bytes: float = 4096) -> PipelineCosts:
    return PipelineCosts(device_input=part, device_output=part, cloud=part, cloud_queue_s=0.0, uplink_bytes_per_s=up,
                         downlink_bytes_per_s=down, rtt_s=rtt, up_bytes_per_token=4096, down_bytes_per_token=down_bytes)


TYPICAL = PipelineCosts(device_input=LinearCost(1e-3, 3e-5, 2e-9), device_output=LinearCost(1e-3, 3e-5, 2e-9),
                        cloud=LinearCost(2e-3, 1e-5, 2e-10), cloud_queue_s=0.0, uplink_bytes_per_s=2e7,
                        downlink_bytes_per_s=2e7, rtt_s=0.03, up_bytes_per_token=4096, down_bytes_per_token=4096)

# --------------------------------------------------------------------------------------- cut helpers


def test_even_cut_sizes_differ_by_at_most_one():
    """even_cut gives `pieces` sizes summing to the total, larger ones first, differing by at most one."""
    for tokens in (1, 7, 100, 2049):
        for pieces in range(1, min(tokens, 40) + 1):
            sizes = even_cut(tokens, pieces)
            assert len(sizes) == pieces and sum(sizes) == tokens
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            assert sizes == sorted(sizes, reverse=True)


def test_fixed_cut_is_full_pieces_plus_a_remainder():
    """fixed_cut gives size-`size` pieces and, unless it divides the total, one smaller last piece."""
    assert fixed_cut(100, 30) == [30, 30, 30, 10]
    assert fixed_cut(90, 30) == [30, 30, 30]
    assert fixed_cut(5, 30) == [5]


def test_ramp_cut_doubles_then_holds_then_tapers():
    """ramp_cut: chunks doubling from `first`, then `steady`-sized ones, mirrored at the end with `taper`."""
    assert ramp_cut(1000, 16, 128, taper=False) == [16, 32, 64] + even_cut(888, 7)
    tapered = ramp_cut(1000, 16, 128, taper=True)
    assert tapered[:3] == [16, 32, 64] and tapered[-3:] == [64, 32, 16] and sum(tapered) == 1000
    assert ramp_cut(10, 16, 128, taper=True) == [10]  # too short for a ramp: one piece
    rng = random.Random(3)
    for _ in range(500):
        tokens, first = rng.randint(1, 5000), 2 ** rng.randint(0, 8)
        sizes = ramp_cut(tokens, first, rng.randint(1, 1024), rng.random() < 0.5)
        assert sum(sizes) == tokens and min(sizes) >= 1


def test_ramp_cut_never_exceeds_steady():
    """No piece of a ramp is larger than `steady` (the planner passes max_chunk as the largest steady size)."""
    assert max(ramp_cut(1532, 256, 512, taper=False)) <= 512
    rng = random.Random(4)
    for _ in range(500):
        tokens, first, steady = rng.randint(1, 5000), 2 ** rng.randint(0, 8), rng.randint(1, 1024)
        assert max(ramp_cut(tokens, first, steady, rng.random() < 0.5)) <= max(steady, 1)


# --------------------------------------------------------------------------------------- ChunkingConfig


def test_config_modes():
    """mode is "none" without chunking, "fixed" with a chunk size, "adaptive" otherwise."""
    assert ChunkingConfig().mode == "adaptive"
    assert ChunkingConfig(fixed_size=128).mode == "fixed"
    assert ChunkingConfig(enabled=False).mode == "none"


@pytest.mark.parametrize("fields", [
    dict(fixed_size=-1),
    dict(enabled=False, fixed_size=64),
    dict(max_in_flight=0),
    dict(min_chunk=0),
    dict(max_chunks=0),
    dict(replan_drift=0.0),
    dict(replan_drift=float("nan")),
])
def test_config_rejects_bad_settings(fields):
    """Contradictory or non-positive settings raise ValueError."""
    with pytest.raises(ValueError):
        ChunkingConfig(**fields)


# --------------------------------------------------------------------------------------- plans: shape


def test_plans_cover_the_prompt_within_limits():
    """Every mode's plan sums to the prompt, has sizes >= 1, predicts what simulate_prefill predicts; "none" and
    "fixed" respect max_chunk, and an adaptive plan has at most max_chunks chunks unless max_chunk forces more."""
    configs = [ChunkingConfig(), ChunkingConfig(enabled=False), ChunkingConfig(fixed_size=100),
               ChunkingConfig(min_chunk=8, max_chunks=16), ChunkingConfig(min_chunk=64, max_chunks=8)]
    for tokens, max_chunk, costs, in_flight, start in random_cases(seed=1, count=120):
        for base in configs:
            config = ChunkingConfig(enabled=base.enabled, fixed_size=base.fixed_size, min_chunk=base.min_chunk,
                                    max_chunks=base.max_chunks, max_in_flight=in_flight)
            plan = ChunkPlanner(config).plan(tokens, costs, max_chunk, start)
            assert sum(plan.sizes) == tokens and min(plan.sizes) >= 1
            assert plan.predicted_s == pytest.approx(ttft(plan.sizes, costs, in_flight, start), rel=1e-12)
            if config.mode == "adaptive":
                assert len(plan.sizes) <= max(config.max_chunks, math.ceil(tokens / max_chunk))
            else:
                assert max(plan.sizes) <= max_chunk


def test_adaptive_plans_respect_max_chunk():
    """No adaptive plan has a chunk larger than max_chunk; e.g. 1532 tokens with max_chunk 512 on a slow downlink
    comes out as (256, 638, 638), and 96 tokens with max_chunk 40 and costly forwards as (96,)."""
    costly = LinearCost(0.05, 1e-5, 0.0)
    plan = ChunkPlanner().plan(96, uniform_costs(costly, up=1e15, down=1e15, rtt=0.0), max_chunk=40)
    assert max(plan.sizes) <= 40, plan.sizes
    costs = PipelineCosts(device_input=LinearCost(0.0, 3e-6, 0.0), device_output=LinearCost(0.0, 2e-5, 0.0),
                          cloud=LinearCost(0.0, 1e-5, 0.0), cloud_queue_s=0.0, uplink_bytes_per_s=1e8,
                          downlink_bytes_per_s=1.5e6, rtt_s=0.07, up_bytes_per_token=8192, down_bytes_per_token=0)
    plan = ChunkPlanner(ChunkingConfig(max_in_flight=2)).plan(1532, costs, max_chunk=512)
    assert max(plan.sizes) <= 512, plan.sizes
    for tokens, max_chunk, costs, in_flight, start in random_cases(seed=2, count=200):
        plan = ChunkPlanner(ChunkingConfig(max_in_flight=in_flight)).plan(tokens, costs, max_chunk, start)
        assert max(plan.sizes) <= max_chunk, (tokens, max_chunk, plan.sizes)


def test_none_mode_cuts_only_at_the_cloud_limit():
    """Without chunking the prompt goes in ceil(tokens / max_chunk) even pieces."""
    planner = ChunkPlanner(ChunkingConfig(enabled=False))
    assert planner.plan(500, TYPICAL, max_chunk=4096).sizes == (500,)
    assert planner.plan(4096, TYPICAL, max_chunk=4096).sizes == (4096,)
    sizes = planner.plan(1000, TYPICAL, max_chunk=256).sizes
    assert len(sizes) == 4 and sum(sizes) == 1000 and max(sizes) - min(sizes) <= 1


def test_fixed_mode_uses_the_fixed_size_plus_a_remainder():
    """A fixed chunk size gives pieces of that size and a smaller last one; never above max_chunk."""
    planner = ChunkPlanner(ChunkingConfig(fixed_size=100))
    assert planner.plan(350, TYPICAL, max_chunk=4096).sizes == (100, 100, 100, 50)
    assert planner.plan(300, TYPICAL, max_chunk=4096).sizes == (100, 100, 100)
    assert planner.plan(30, TYPICAL, max_chunk=4096).sizes == (30,)
    assert planner.plan(350, TYPICAL, max_chunk=64).sizes == (64,) * 5 + (30,)


def test_empty_prompt_is_refused():
    """Planning zero tokens raises ValueError."""
    with pytest.raises(ValueError):
        ChunkPlanner().plan(0, TYPICAL, max_chunk=512)


# --------------------------------------------------------------------------------------- plans: quality


def test_adaptive_plan_beats_the_unchunked_plan():
    """The adaptive plan never predicts a later first token than the "none" plan (same costs and limits)."""
    for tokens, max_chunk, costs, in_flight, start in random_cases(seed=3, count=200):
        adaptive = ChunkPlanner(ChunkingConfig(max_in_flight=in_flight)).plan(tokens, costs, max_chunk, start)
        unchunked = ChunkingConfig(enabled=False, max_in_flight=in_flight)
        none = ChunkPlanner(unchunked).plan(tokens, costs, max_chunk, start)
        assert adaptive.predicted_s <= none.predicted_s


def test_adaptive_plan_is_near_the_best_even_and_fixed_cuts():
    """The adaptive plan is within 5% of every even cut into k pieces it may choose (from the fewest max_chunk
    allows to max_chunks, pieces of min_chunk or more) and of every fixed-size plan of min_chunk or more with at
    most max_chunks chunks, on random costs."""
    defaults = ChunkingConfig()
    for tokens, max_chunk, costs, in_flight, start in random_cases(seed=4, count=150):
        plan = ChunkPlanner(ChunkingConfig(max_in_flight=in_flight)).plan(tokens, costs, max_chunk, start)
        fewest = math.ceil(tokens / max_chunk)
        most = max(fewest, min(defaults.max_chunks, tokens // defaults.min_chunk))
        for k in range(fewest, most + 1):
            assert plan.predicted_s <= 1.05 * ttft(even_cut(tokens, k), costs, in_flight, start)
        for size in (16, 32, 64, 128, 256, 512, 1024):
            sizes = fixed_cut(tokens, min(size, max_chunk))
            if len(sizes) <= defaults.max_chunks:
                assert plan.predicted_s <= 1.05 * ttft(sizes, costs, in_flight, start)


def test_adaptive_plan_beats_every_even_cut():
    """Exactly: 2000 tokens, max_chunk 64 (32 to 64 pieces): the adaptive plan is no slower than any even cut; here
    the planner tries 32, 40, 50, 62 and 64 pieces (and ramps); the even cuts into 33 to 36 pieces, not tried, are up to
    2.6% faster than the plan it returns."""
    device = LinearCost(1e-3, 1e-4, 0.0)
    costs = PipelineCosts(device_input=device, device_output=device, cloud=LinearCost(1e-3, 1e-5, 0.0),
                          cloud_queue_s=0.0, uplink_bytes_per_s=1e8, downlink_bytes_per_s=1e8, rtt_s=0.02,
                          up_bytes_per_token=4096, down_bytes_per_token=4096)
    plan = ChunkPlanner(ChunkingConfig(max_in_flight=8)).plan(2000, costs, max_chunk=64)
    for k in range(32, 65):
        assert plan.predicted_s <= ttft(even_cut(2000, k), costs, 8), k


def test_slow_link_and_cheap_compute_give_many_chunks():
    """When hidden states crawl over a slow link both ways and compute is nearly free, the plan pipelines the
    uplink with the downlink in many chunks, nearly halving the unchunked time."""
    cheap = LinearCost(1e-5, 1e-7, 0.0)
    costs = uniform_costs(cheap, up=1e5, down=1e5)
    plan = ChunkPlanner().plan(2048, costs, max_chunk=4096)
    assert len(plan.sizes) >= 32
    assert plan.predicted_s < 0.6 * ttft([2048], costs, 8)


def test_fast_link_and_costly_forwards_give_few_chunks():
    """With an infinitely fast link and a large fixed cost per forward, the plan uses as few chunks as the cloud's
    limit allows."""
    costly = LinearCost(0.05, 1e-5, 0.0)
    costs = uniform_costs(costly, up=1e15, down=1e15, rtt=0.0)
    assert ChunkPlanner().plan(2048, costs, max_chunk=4096).sizes == (2048,)
    assert len(ChunkPlanner().plan(2048, costs, max_chunk=512).sizes) == 4


def test_plan_starts_at_the_given_position():
    """`start` is passed to the cost model: the prediction is simulate_prefill's from that position."""
    costs = TYPICAL
    plan = ChunkPlanner().plan(1000, costs, max_chunk=512, start=3000)
    assert plan.predicted_s == pytest.approx(ttft(plan.sizes, costs, 8, start=3000), rel=1e-12)
    assert plan.predicted_s > ChunkPlanner().plan(1000, costs, max_chunk=512).predicted_s


def test_planning_2048_tokens_weighs_few_candidates(monkeypatch):
    """Planning a 2048-token prompt weighs a bounded number of candidate cuts (deterministic), and takes no longer
    than 80 simulations of its own longest candidate measured in the same run (a ratio, so a loaded machine holds
    it; `scripts/bench_chunking.py` prints the planning time in ms)."""
    planner = ChunkPlanner()
    many_chunks = uniform_costs(LinearCost(1e-5, 1e-7, 0.0), up=1e5, down=1e5)
    for costs in (TYPICAL, many_chunks):
        calls = []
        evaluate = ChunkPlanner.evaluate
        monkeypatch.setattr(ChunkPlanner, "evaluate", lambda self, *a, **k: calls.append(a[0]) or evaluate(self, *a, **k))
        planner.plan(2048, costs, max_chunk=4096)
        monkeypatch.undo()
        assert len(calls) <= 60
        longest = max(calls, key=len)
        plan_s = sim_s = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            planner.plan(2048, costs, max_chunk=4096)
            plan_s = min(plan_s, time.perf_counter() - began)
            began = time.perf_counter()
            ttft(longest, costs, 8)
            sim_s = min(sim_s, time.perf_counter() - began)
        assert plan_s < 80 * sim_s


def test_a_pipelined_cloud_gets_more_chunks_and_a_sooner_first_token():
    """With the cloud the bottleneck (fast link, light device, costly middle part), a cloud of 4 pipeline stages
    overlaps consecutive chunks: the planner cuts the prompt finer than for 1 stage and predicts a sooner first
    token, never later than 1 stage's plan would take on the pipelined cloud."""
    light = LinearCost(2e-4, 2e-6, 0.0)
    costs = dataclasses.replace(TYPICAL, device_input=light, device_output=light, cloud=LinearCost(1e-3, 2e-4, 1e-9), uplink_bytes_per_s=1e9, downlink_bytes_per_s=1e9,
                                rtt_s=0.002)
    piped = dataclasses.replace(costs, cloud_stages=4)
    planner = ChunkPlanner(ChunkingConfig())
    single, four = planner.plan(2048, costs, 8192), planner.plan(2048, piped, 8192)
    assert len(four.sizes) > len(single.sizes)
    assert four.predicted_s < 0.6 * single.predicted_s
    assert four.predicted_s <= ttft(single.sizes, piped, ChunkingConfig().max_in_flight) + 1e-12
