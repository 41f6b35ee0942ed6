"""Calibration reads back what a run measured: rounds built with a known overhead, drafting and verification cost,
and device dumps at a known power mode, give exactly those figures."""
from __future__ import annotations

import json

import pytest

from hat.common.cost_fit import LinearCost
from hat.testbed.calibration import CalibrationError, calibrate
from hat.testbed.records import ExperimentRecord, TimelineStep
from hat.testbed.report import write_report
from hat.testbed.scenario import parse_scenario
from hat.testbed.sim_costs import HEADER_BYTES

SCENARIO = parse_scenario({
    "name": "c", "devices": [{"count": 1, "class": "jetson-agx-xavier", "power": [[0, "15W"]],
                              "link": {"up_MBps": 10, "down_MBps": 15, "rtt_ms": 20}}],
    "workload": {"shape": "specbench", "requests": 2, "rate": 1.0}, "systems": ["full"]})
MODE = 2.06  # the Xavier's 15W factor against its MAXN
TOKEN_BYTES = 256 * 4  # the reference model's hidden size, float32


CLOUD = LinearCost(0.003, 2e-4, 1e-6)  # the middle part's true cost in the fake run


def _round(drafted: int, accepted: int, kept: int, fresh: int, position: int) -> TimelineStep:
    """A verification round at `position` that drafted `fresh` tokens before its send (2 ms each at MAXN)."""
    tokens = drafted + 1
    link_ms = ((64 + TOKEN_BYTES * tokens) / 10e6 + (64 + TOKEN_BYTES * tokens) / 15e6 + 0.020) * 1000
    return TimelineStep("decode", tokens, 0.0, 5.0 + link_ms + 3.0, CLOUD.predict(tokens, position) * 1000,
                        0.0, accepted, drafted, 2.0 * fresh * MODE, kept, 5.0, 1)


def _intervals(rounds: list[TimelineStep]) -> list[float]:
    """Token intervals of those rounds: drafting, the round trip and 1 ms + 0.5 ms a position after the reply (at
    15W), then the round's other tokens at once."""
    out = []
    for s in rounds:
        out += [s.draft_ms + s.round_ms + (1.0 + 0.5 * s.tokens) * MODE] + [0.0] * s.accepted
    return out


def _write_run(folder, with_costs: bool = True, idle: bool = False, cloud_only: tuple = ()):
    """`idle`: two more rounds drafting nothing (one running the adapter, 4 ms at MAXN; one after giving up, no time);
    `cloud_only`: records of a cloud-only system beside the full one's."""
    prefill = [TimelineStep("prefill", 25, 0, 30, CLOUD.predict(25) * 1000, 5, batch_sessions=1),
               TimelineStep("prefill", 15, 0, 30, CLOUD.predict(15, 25) * 1000, 5, batch_sessions=1)]
    rounds = [_round(3, 3, 2, 3, 40), _round(4, 1, 0, 2, 44), _round(2, 0, 0, 2, 46), _round(5, 2, 0, 5, 47)]
    if idle:
        rounds += [_round(0, 0, 0, 0, 50), _round(0, 0, 0, 0, 51)]
        rounds[-2].draft_ms = 4.0 * MODE
    rounds[1].batch_sessions = 2  # shared with another session: its time is not this round's alone
    rounds[1].cloud_ms = 1e3
    tbt = _intervals(rounds)
    records = [ExperimentRecord("full", i, 0, "jetson-agx-xavier", float(i), float(i), i + 1.0, 40, len(tbt) + 1,
                                100.0, 90.0, tbt, 2.0, timeline=[*prefill, *rounds]) for i in range(2)]
    write_report(folder, "c", {"full": records, **({"cloud-only": list(cloud_only)} if cloud_only else {})}, 1000,
                 100, [])
    if with_costs:
        cost = {"base_s": 0.001 * MODE, "per_token_s": 1e-4 * MODE, "per_attended_s": 0.0}
        (folder / "device_costs.json").write_text(json.dumps({"full": [{
            "device": 0, "device_class": "jetson-agx-xavier", "system": "full", "mode_factor": MODE, "input": cost,
            "output": cost, "final_s": 0.002 * MODE, "rtt_s": 0.02,
            "cloud": {"base_s": 0.004, "per_token_s": 1e-5, "per_attended_s": 0.0}}]}))


def test_calibration_recovers_the_runs_figures(tmp_path):
    _write_run(tmp_path)
    costs, requests = calibrate(SCENARIO, tmp_path)
    full = costs["full"]
    assert full.overhead_s == pytest.approx(0.003, abs=1e-9)
    # the forwards rounds had to themselves give the cloud's cost; what devices planned with is its published fit
    for tokens, start in ((1, 0), (5, 100), (300, 500)):
        assert full.cloud.predict(tokens, start) == pytest.approx(CLOUD.predict(tokens, start), rel=1e-6)
    assert full.cloud_predictor == LinearCost(0.004, 1e-5, 0.0)
    device = full.devices["jetson-agx-xavier"]
    assert device.input.predict(10) == pytest.approx(0.001 + 1e-3)  # the dump at 15W, brought back to MAXN
    assert device.final_s == pytest.approx(0.002)
    assert device.after_round.predict(4) == pytest.approx(0.003)  # 1 ms + 0.5 ms a position
    # drafting: the first round drafts 3; the second 4, of which 2 were kept from the first (only 2 fresh)
    assert device.before_round.predict(3) == pytest.approx(0.006, rel=1e-6)
    assert full.speculation.rounds == ((3, 3, 2), (4, 1, 0), (2, 0, 0), (5, 2, 0)) * 2
    assert full.up_bytes_per_token == TOKEN_BYTES and full.down_bytes_per_token == TOKEN_BYTES
    assert [(r.index, r.prompt_tokens, r.new_tokens) for r in requests["full"]] == [(0, 40, 11), (1, 40, 11)]


def test_a_run_without_device_costs_is_refused_by_name(tmp_path):
    _write_run(tmp_path, with_costs=False)
    with pytest.raises(CalibrationError, match="device_costs.json"):
        calibrate(SCENARIO, tmp_path)


def test_rounds_that_draft_nothing_give_the_idle_step_and_leave_the_drafting_fit_alone(tmp_path):
    _write_run(tmp_path, idle=True)
    device = calibrate(SCENARIO, tmp_path)[0]["full"].devices["jetson-agx-xavier"]
    assert device.idle_round_s == pytest.approx(0.004)  # the one that ran the adapter, at 15W brought back to MAXN
    assert device.before_round.predict(3) == pytest.approx(0.006, rel=1e-6)
    assert device.after_round.predict(4) == pytest.approx(0.003)
    _write_run(tmp_path)
    assert calibrate(SCENARIO, tmp_path)[0]["full"].devices["jetson-agx-xavier"].idle_round_s == 0.0


def _cloud_only(request: int, started: float, gaps: list[float], ttft_ms: float = 50.0) -> ExperimentRecord:
    """A cloud-only request started at `started` s: its first token after `ttft_ms`, then tokens `gaps` ms apart."""
    sent, timeline = ttft_ms, [TimelineStep("prefill", 10, 0.0, ttft_ms, 0.0, 0.0)]
    for gap in gaps:
        timeline.append(TimelineStep("decode", 1, sent, gap, 0.0, 0.0))
        sent += gap
    return ExperimentRecord("cloud-only", request, 0, "jetson-agx-xavier", started, started, started + sent / 1000,
                            10, len(gaps) + 1, ttft_ms, ttft_ms, gaps, timeline=timeline)


def test_cloud_only_pays_per_further_sequence_what_its_own_run_measured(tmp_path):
    """Alone, tokens come 80 ms apart; while one other request decodes, 124 ms apart; while three others do,
    80 + 3 x 44 ms: 44 ms a further sequence. A gap during another's prompt says nothing of it and is left out."""
    first = _cloud_only(0, 0.0, [80.0] * 10 + [124.0] * 5 + [212.0] * 5)  # alone for 0.85 s, then shared
    others = [_cloud_only(1, 0.86, [124.0] * 5 + [212.0] * 5, ttft_ms=10.0), _cloud_only(2, 1.5, [212.0] * 4, ttft_ms=1.0),
              _cloud_only(3, 1.5, [212.0] * 4, ttft_ms=1.0)]
    _write_run(tmp_path, cloud_only=(first, *others))
    costs = calibrate(SCENARIO, tmp_path)[0]["cloud-only"]
    assert costs.cloud.per_sequence_s == pytest.approx(0.044)
    assert costs.cloud.spans([(1, 20), (1, 30)]) == pytest.approx(costs.cloud.predict(1, 20) + costs.cloud.predict(1, 30)
                                                                 - costs.cloud.cost.base_s + 0.044)


def test_cloud_only_cost_is_fitted_to_its_own_forwards_while_alone(tmp_path):
    """Requests one after another: each first token comes the whole model's prompt forward plus the link after the
    start, each further token one forward at its position after the one before; the fit gives that model back."""
    whole = LinearCost(0.03, 2e-4, 1e-7)
    records, start = [], 0.0
    for i, prompt in enumerate((12, 40, 90, 200)):
        link_s = (HEADER_BYTES + 4 * prompt) / 10e6 + (HEADER_BYTES + 4) / 15e6 + 0.020
        gaps = [whole.predict(1, prompt + k) * 1000 for k in range(1, 6)]
        record = _cloud_only(i, start, gaps, ttft_ms=(whole.predict(prompt) + link_s) * 1000)
        record.prompt_tokens = prompt
        records.append(record)
        start = record.finished_s + 0.5
    _write_run(tmp_path, cloud_only=records)
    costs = calibrate(SCENARIO, tmp_path)[0]["cloud-only"]
    for tokens, at in ((1, 0), (1, 300), (64, 0), (500, 0)):
        assert costs.cloud.predict(tokens, at) == pytest.approx(whole.predict(tokens, at), rel=1e-4)
    assert costs.cloud.per_sequence_s == 0.0  # never two at once: nothing measured
    assert any("fitted to its own run" in n for n in costs.notes)
