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


def _write_run(folder, with_costs: bool = True):
    prefill = [TimelineStep("prefill", 25, 0, 30, CLOUD.predict(25) * 1000, 5, batch_sessions=1),
               TimelineStep("prefill", 15, 0, 30, CLOUD.predict(15, 25) * 1000, 5, batch_sessions=1)]
    rounds = [_round(3, 3, 2, 3, 40), _round(4, 1, 0, 2, 44), _round(2, 0, 0, 2, 46), _round(5, 2, 0, 5, 47)]
    rounds[1].batch_sessions = 2  # shared with another session: its time is not this round's alone
    rounds[1].cloud_ms = 1e3
    tbt = _intervals(rounds)
    records = [ExperimentRecord("full", i, 0, "jetson-agx-xavier", float(i), float(i), i + 1.0, 40, len(tbt) + 1,
                                100.0, 90.0, tbt, 2.0, timeline=[*prefill, *rounds]) for i in range(2)]
    write_report(folder, "c", {"full": records}, 1000, 100, [])
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
