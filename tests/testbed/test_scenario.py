"""Scenario files: the shipped ones parse; every mistake is refused with the field named."""
from __future__ import annotations

import copy

import pytest
import yaml

from hat.testbed.scenario import SHIPPED, ScenarioError, load_scenario, parse_scenario, resolve_scenario

VALID = {
    "name": "t", "model": "reference", "split": {"input_layers": 2, "output_layers": 1},
    "devices": [{"count": 2, "class": "jetson-agx-orin", "power": [[0, "MAXN"], [10, "15W"]],
                 "link": {"up_MBps": 5, "down_MBps": 10, "rtt_ms": 30, "jitter_ms": 1}}],
    "workload": {"shape": "specbench", "requests": 4, "rate": 2.0, "max_new_tokens": 32, "seed": 3},
    "systems": ["u-shape", "full"], "slo": {"ttft_ms": 1500, "tbt_ms": 80},
}


def test_a_valid_scenario_parses_to_what_it_says():
    s = parse_scenario(copy.deepcopy(VALID))
    assert (s.name, s.input_layers, s.output_layers, s.device_count, s.systems) == ("t", 2, 1, 2, ("u-shape", "full"))
    group = s.devices[0]
    assert group.power == ((0.0, "MAXN"), (10.0, "15W")) and group.schedule().factor_at(11) == pytest.approx(3.10)
    profile = group.link.profile()
    assert (profile.uplink_bytes_per_s, profile.downlink_bytes_per_s, profile.rtt_s, profile.jitter_s) == \
        (5e6, 10e6, 0.03, 0.001)
    assert (s.workload.requests, s.workload.rate, s.ttft_slo_ms, s.tbt_slo_ms) == (4, 2.0, 1500.0, 80.0)


@pytest.mark.parametrize("name", sorted(p.stem for p in SHIPPED.glob("*.yaml")))
def test_every_shipped_scenario_loads_by_name(name):
    scenario = load_scenario(name)
    assert scenario.name == name and scenario.systems and scenario.device_count >= 1
    assert resolve_scenario(name) == SHIPPED / f"{name}.yaml"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(colour="red"), "unknown keys \\['colour'\\]"),
    (lambda d: d["devices"][0].update(clas="x"), "devices\\[0\\]: unknown keys \\['clas'\\]"),
    (lambda d: d["devices"][0].update({"class": "raspberry-pi"}), "devices\\[0\\].class"),
    (lambda d: d["devices"][0].update(power=[[0, "TURBO"]]), "devices\\[0\\]: .*power modes"),
    (lambda d: d["devices"][0].update(power=[[5, "MAXN"]]), "devices\\[0\\]: .*time 0"),
    (lambda d: d["devices"][0].update(count=0), "count"),
    (lambda d: d["devices"][0]["link"].update(up_MBps=0), "devices\\[0\\]: .*rates must be positive"),
    (lambda d: d["devices"][0]["link"].update(rtt=3), "devices\\[0\\].link: unknown keys"),
    (lambda d: d.update(devices=[]), "at least one group"),
    (lambda d: d["workload"].update(shape="wikitext"), "workload.shape"),
    (lambda d: d["workload"].update(rate=0), "workload"),
    (lambda d: d.update(systems=["u-shape", "vllm"]), "systems: \\['vllm'\\]"),
    (lambda d: d.pop("workload"), "missing 'workload'"),
    (lambda d: d["slo"].update(ttft=1), "slo: unknown keys"),
])
def test_mistakes_are_refused_by_name(edit, message):
    data = copy.deepcopy(VALID)
    edit(data)
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(data)


def test_files_that_are_not_scenarios(tmp_path):
    with pytest.raises(ScenarioError, match="no scenario file"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(bad)


def test_a_link_may_follow_a_bandwidth_trace_next_to_the_scenario(tmp_path):
    (tmp_path / "trace.csv").write_text("time_s,up_MBps,down_MBps\n0,8,12\n2,4,6\n")
    data = copy.deepcopy(VALID)
    data["devices"][0]["link"] = {"trace": "trace.csv", "rtt_ms": 10}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    profile = load_scenario(tmp_path / "s.yaml").devices[0].link.profile()
    assert profile.trace.rates_at(0.5) == (8e6, 12e6) and profile.trace.rates_at(3) == (4e6, 6e6)
    assert (profile.uplink_bytes_per_s, profile.rtt_s) == (8e6, 0.01)
    data["devices"][0]["link"]["trace"] = "missing.csv"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError, match="devices\\[0\\]"):
        load_scenario(tmp_path / "s.yaml")
