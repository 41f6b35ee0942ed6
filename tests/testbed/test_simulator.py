"""The discrete-event simulator against oracles: the system's own prefill cost model (simulate_prefill) for one
device on an idle cloud, a decode round's time by hand, the real scheduler's batching, and the scale machinery."""
from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hat.common.cost_fit import LinearCost
from hat.common.prefill_pipeline import PipelineCosts, simulate_prefill
from hat.device.draft_length import GIVE_UP_ROUNDS
from hat.testbed.link_shim import LinkModel, LinkProfile
from hat.testbed.scenario import parse_scenario
from hat.testbed.sim_cloud import SimCloud
from hat.testbed.sim_costs import DeviceCosts, SequenceCost, SpeculationModel, SystemCosts
from hat.testbed.sim_kernel import Future, Simulation
from hat.testbed.sim_run import scaled_scenario, simulate_system
from hat.testbed.simulator import MAX_IN_FLIGHT, SimDevice, SimRequest
from hat.testbed.systems import SYSTEMS

SCENARIO = {"name": "t", "devices": [{"count": 1, "class": "jetson-agx-orin",
                                      "link": {"up_MBps": 10, "down_MBps": 15, "rtt_ms": 20}}],
            "workload": {"shape": "specbench", "requests": 4, "rate": 1.0}, "systems": ["u-shape"]}


def _costs(device: DeviceCosts, cloud: LinearCost, overhead_s: float = 0.0, **extra) -> SystemCosts:
    return SystemCosts({"jetson-agx-orin": device}, cloud, cloud, overhead_s, None, 1024.0, 1024.0, 64.0, **extra)


def _device(inp: LinearCost, out: LinearCost, final_s: float, before=LinearCost(0, 0, 0),
            after=LinearCost(0, 0, 0)) -> DeviceCosts:
    return DeviceCosts(inp, out, final_s, before, after, inp, out)


def test_kernel_runs_events_in_time_order_and_processes_wait_on_futures():
    sim, log = Simulation(), []
    gate = Future()

    def waiter():
        value = yield gate
        log.append(("woke", sim.now, value))

    def sleeper():
        yield 1.5
        log.append(("slept", sim.now))
        gate.resolve("go")

    sim.spawn(waiter())
    sim.spawn(sleeper())
    sim.run()
    assert log == [("slept", 1.5), ("woke", 1.5, "go")]
    def bad():
        yield "not a delay"

    with pytest.raises(TypeError):
        sim.spawn(bad())
        sim.run()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=20), seed=st.integers(0, 2 ** 32))
def test_one_device_prefill_matches_the_systems_own_pipeline_model(sizes, seed):
    """On an idle cloud, the event-by-event prefill lands where hat.common.prefill_pipeline predicts, to rounding.
    Costs are drawn from a seed (continuous values): two events at exactly the same instant may be taken in either
    order by the two, so the property holds in general position, not on ties."""
    rng = random.Random(seed)

    def linear() -> LinearCost:
        return LinearCost(rng.uniform(0, 0.01), rng.uniform(0, 1e-3), rng.uniform(0, 1e-7))

    inp, out, cloud = linear(), linear(), linear()
    final_s, up, down, rtt = rng.uniform(0, 0.01), rng.uniform(1e5, 1e8), rng.uniform(1e5, 1e8), rng.uniform(0, 0.1)
    scenario = parse_scenario(SCENARIO)
    costs = _costs(_device(inp, out, final_s), cloud)
    sim = Simulation()
    link = LinkModel(LinkProfile(up, down, rtt))
    device = SimDevice(sim, 0, scenario.devices[0], link, SimCloud(sim, costs), SYSTEMS["u-shape"], costs, 0)
    sim.spawn(device._prefill("s", sizes, [], 0.0))
    sim.run()
    want = simulate_prefill(sizes, PipelineCosts(inp, out, cloud, 0.0, up, down, rtt, 1024.0, 1024.0, 64.0, final_s),
                            MAX_IN_FLIGHT).ttft_s
    assert sim.now == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_a_plain_decode_round_costs_compute_link_cloud_and_overhead():
    scenario = parse_scenario(SCENARIO)
    before, after, cloud = LinearCost(0.002, 0, 0), LinearCost(0.003, 0, 0), LinearCost(0.010, 0.0001, 0)
    costs = _costs(_device(LinearCost(0, 1e-5, 0), LinearCost(0, 1e-5, 0), 0.001, before, after), cloud,
                   overhead_s=0.004)
    records, _ = simulate_system(scenario, "u-shape", costs, [SimRequest(0, 0.0, 10, 5)])
    link = scenario.devices[0].link
    message = 64 + 1024
    round_s = (0.002 + message / (link.up_MBps * 1e6) + cloud.predict(1) + message / (link.down_MBps * 1e6)
               + link.rtt_ms / 1000 + 0.004 + 0.003)
    assert [t / 1000 for t in records[0].tbt_ms] == pytest.approx([round_s] * 4, rel=1e-9)
    assert records[0].new_tokens == 5 and not records[0].error


def test_concurrent_rounds_are_batched_by_the_real_scheduler():
    """Four devices decoding in lockstep share every cloud forward; a cloud-only session steps every batch."""
    scenario = parse_scenario({**SCENARIO, "devices": [{**SCENARIO["devices"][0], "count": 4}]})
    cloud = LinearCost(0.02, 0, 0)
    costs = _costs(_device(LinearCost(0, 0, 0), LinearCost(0, 0, 0), 0.0), cloud)
    requests = [SimRequest(i, 0.0, 16, 20) for i in range(4)]
    _, stats = simulate_system(scenario, "u-shape", costs, requests)
    assert stats["largest_batch"] == 4 and stats["batches"] == 20  # one prefill batch, 19 decode batches
    whole = dataclasses.replace(costs, devices={}, cloud_tokens=True)
    records, stats = simulate_system(scenario, "cloud-only", whole, requests)
    assert stats["batches"] == 20 and stats["largest_batch"] == 4
    assert all(tbt == pytest.approx(20.0) for r in records for tbt in r.tbt_ms)


def test_speculation_model_draws_rounds_within_the_budget():
    model = SpeculationModel.geometric(0.8, 4, 8, seed=1)
    assert 1 < model.accept_len() < 5
    rng = random.Random(0)
    for _ in range(200):
        drafted, accepted, kept = model.draw(rng, 2)
        assert drafted <= 2 and accepted <= drafted and (kept == 0 or accepted == drafted)
    with pytest.raises(ValueError):
        SpeculationModel(((2, 3, 0),), "accepted more than drafted")


def test_scaling_keeps_the_per_device_rate():
    scenario = parse_scenario({**SCENARIO, "devices": [SCENARIO["devices"][0], {**SCENARIO["devices"][0],
                                                                                 "class": "jetson-agx-xavier"}]})
    big = scaled_scenario(scenario, 100)
    assert big.device_count == 100 and [g.count for g in big.devices] == [50, 50]
    assert big.workload.rate == pytest.approx(50.0) and big.workload.requests == 200


HARDWARE = {**SCENARIO, "split": {"input_layers": 1, "output_layers": 1},
            "devices": [{"count": 2, "class": "jetson-agx-orin", "link": {"up_MBps": 10, "down_MBps": 15, "rtt_ms": 20}},
                        {"count": 2, "class": "jetson-agx-xavier", "link": {"up_MBps": 5, "down_MBps": 10, "rtt_ms": 20}}],
            "workload": {"shape": "specbench", "requests": 8, "rate": 2.0, "max_new_tokens": 16},
            "systems": ["cloud-only", "u-shape", "full"],
            "hardware": {"model": "vicuna-7b", "cloud": "a6000"}, "scale": {"devices": [8]}}


def test_hardware_sections_are_checked_by_field():
    from hat.testbed.scenario import ScenarioError

    for bad, match in (({"model": "vicuna-7b", "gpu": "a6000"}, "unknown keys"),
                       ({"model": "vicuna-7b", "cloud": "tpu"}, "hardware.cloud"),
                       ({"model": "gpt-9"}, "not a preset"),
                       ({"model": "vicuna-7b", "acceptance_rate": 1.5}, "acceptance_rate")):
        with pytest.raises(ScenarioError, match=match):
            parse_scenario({**HARDWARE, "hardware": bad})


def test_roofline_costs_hold_the_split_and_the_cloud_memory():
    from hat.testbed.roofline import ACCELERATORS, RooflineCost, model_shape
    from hat.testbed.sim_hardware import roofline_costs

    scenario = parse_scenario(HARDWARE)
    costs = roofline_costs(scenario.hardware, 1, 1, scenario.systems)
    shape, a6000 = model_shape("vicuna-7b"), ACCELERATORS["a6000"]
    middle = RooflineCost(shape, a6000, 30)
    assert costs["u-shape"].cloud.predict(7, 100) == middle.predict(7, 100)
    assert costs["u-shape"].kv_positions == int((48e9 - middle.weight_bytes()) * 0.9 / middle.kv_bytes_per_position())
    assert set(costs["full"].devices) == {"jetson-agx-orin", "jetson-agx-xavier"} and costs["full"].speculation
    assert costs["u-shape"].speculation is None and not costs["cloud-only"].devices
    assert costs["cloud-only"].cloud_tokens and costs["cloud-only"].up_bytes_per_token == 4
    xavier, orin = (costs["full"].devices[c] for c in ("jetson-agx-xavier", "jetson-agx-orin"))
    assert xavier.draft_token_s > orin.draft_token_s > 0  # the slower device drafts slower


def test_simulate_writes_the_report_and_the_scale_study(tmp_path):
    from hat.testbed.report import load_results
    from hat.testbed.sim_run import simulate_scenario

    scenario = parse_scenario(HARDWARE)
    out = simulate_scenario(scenario, tmp_path / "sim", progress=False)
    results = load_results(out)
    assert set(results.records_by_system) == {"cloud-only", "u-shape", "full"}
    assert all(not r.error and r.new_tokens == 16 for rs in results.records_by_system.values() for r in rs)
    assert "roofline costs: vicuna-7b" in (out / "summary.md").read_text()
    scale = (out / "scale.md").read_text()
    assert "| 8 |" in scale and "| 4 |" in scale and (out / "scale.png").stat().st_size > 0


def test_rounds_drafting_nothing_cost_the_idle_step_until_the_generation_gives_up():
    """A speculative system whose rounds draft nothing: each round first pays the adapter's idle step (idle_round_s)
    until GIVE_UP_ROUNDS rounds in a row accepted nothing; from then on it decodes plainly, paying none."""
    scenario = parse_scenario(SCENARIO)
    cloud = LinearCost(0.010, 0, 0)
    device = dataclasses.replace(_device(LinearCost(0, 0, 0), LinearCost(0, 0, 0), 0.0), idle_round_s=0.007)
    nothing = SpeculationModel(((0, 0, 0),), "rounds that draft nothing")
    costs = dataclasses.replace(_costs(device, cloud), speculation=nothing)
    new_tokens = GIVE_UP_ROUNDS + 6
    records, _ = simulate_system(scenario, "split-spec", costs, [SimRequest(0, 0.0, 10, new_tokens)])
    link = scenario.devices[0].link
    message = 64 + 1024
    round_s = message / (link.up_MBps * 1e6) + cloud.predict(1) + message / (link.down_MBps * 1e6) + link.rtt_ms / 1000
    want = [round_s + 0.007] * GIVE_UP_ROUNDS + [round_s] * (new_tokens - 1 - GIVE_UP_ROUNDS)
    assert [t / 1000 for t in records[0].tbt_ms] == pytest.approx(want, rel=1e-9)


def test_a_per_sequence_cost_is_paid_for_every_further_sequence_in_a_batch():
    """Four cloud-only sessions in lockstep share every forward: each forward costs one sequence's time plus
    per_sequence_s for each of the three others (and a lone sequence pays none of it)."""
    scenario = parse_scenario({**SCENARIO, "devices": [{**SCENARIO["devices"][0], "count": 4}]})
    whole = SequenceCost(LinearCost(0.02, 0, 0), 0.005)
    costs = dataclasses.replace(_costs(_device(LinearCost(0, 0, 0), LinearCost(0, 0, 0), 0.0), whole), devices={},
                                cloud_tokens=True)
    records, stats = simulate_system(scenario, "cloud-only", costs, [SimRequest(i, 0.0, 16, 20) for i in range(4)])
    assert stats["largest_batch"] == 4
    assert all(tbt == pytest.approx(20.0 + 3 * 5.0) for r in records for tbt in r.tbt_ms)
    assert whole.spans([(1, 5)]) == pytest.approx(0.02) and whole.spans([(0, 5)]) == 0.0
    with pytest.raises(ValueError):
        SequenceCost(LinearCost(0.02, 0, 0), -0.001)
