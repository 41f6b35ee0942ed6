"""Device telemetry: jtop's readings mapped right (a stand-in jtop module, as on a Jetson), the psutil fallback said
once, reports reaching the cloud's /metrics as per-device gauges, and a power-mode change re-profiling the device."""
from __future__ import annotations

import logging
import math
import sys
import types
import urllib.request

import pytest
from cluster import running_cloud

from hat.common.proto import hat_pb2 as pb
from hat.device import telemetry
from hat.device.telemetry import TelemetryReporter, TelemetrySample, TelemetrySource, sample_from_jtop_stats

JETSON_STATS = {"time": "x", "uptime": "1 day", "CPU1": 50, "CPU2": "OFF", "CPU3": 30.0, "GPU": 70, "RAM": 0.4,
                "Temp CPU": 45.5, "Temp GPU": 47.25, "Temp PMIC": -256.0, "Power VDD_GPU_SOC": 3000,
                "Power TOT": 12500, "jetson_clocks": "OFF", "nvp model": "MAXN"}


def _fake_jtop(monkeypatch, stats: dict | None = None, refuse: str = ""):
    """A `jtop` module as jetson-stats offers it: jtop().start() connects (or raises JtopException), .stats reads."""
    module = types.ModuleType("jtop")

    class JtopException(Exception):
        pass

    class jtop:  # noqa: N801 (jetson-stats' name)
        def __init__(self):
            self.stats = dict(stats or {})
            self.closed = False

        def start(self):
            if refuse:
                raise JtopException(refuse)

        def close(self):
            self.closed = True

    module.jtop, module.JtopException = jtop, JtopException
    monkeypatch.setitem(sys.modules, "jtop", module)


def test_jtop_stats_map_to_a_sample():
    sample = sample_from_jtop_stats(JETSON_STATS)
    assert sample.source == "jtop" and sample.power_mode == "MAXN"
    assert sample.power_w == pytest.approx(12.5) and sample.gpu_load == pytest.approx(0.7)
    assert sample.cpu_load == pytest.approx(0.4)  # the core that is OFF is left out
    assert sample.temperature_c == pytest.approx(47.25)  # the offline sensor (-256) is left out
    empty = sample_from_jtop_stats({})
    assert (empty.power_w, empty.cpu_load, empty.gpu_load, empty.temperature_c, empty.power_mode) == (0, 0, -1, 0, "")


def test_a_jetson_is_read_through_jtop(monkeypatch):
    _fake_jtop(monkeypatch, JETSON_STATS)
    source = TelemetrySource()
    assert source.source == "jtop" and source.fallback_reason == ""
    assert source.sample().power_w == pytest.approx(12.5)
    source.close()


def test_elsewhere_psutil_is_read_and_the_fallback_said_once(monkeypatch, caplog):
    monkeypatch.setattr(telemetry, "_fallback_said", telemetry.threading.Event())
    _fake_jtop(monkeypatch, refuse="The jtop.service is not active. Please run: sudo systemctl restart jtop.service")
    with caplog.at_level(logging.WARNING, logger="hat.device"):
        first, second = TelemetrySource(), TelemetrySource()
    assert first.source == second.source == "psutil" and "jtop.service is not active" in first.fallback_reason
    assert [r.message.count("telemetry from psutil") for r in caplog.records] == [1]
    sample = first.sample()
    assert 0 <= sample.cpu_load <= 1 and sample.gpu_load == -1 and sample.power_w == 0 and sample.power_mode == ""
    monkeypatch.setitem(sys.modules, "jtop", None)  # not installed at all
    assert "not installed" in TelemetrySource().fallback_reason


class _Modes:
    """A source whose power mode follows a list (a Jetson switched from MAXN to 15W)."""

    def __init__(self, modes):
        self.modes, self.closed = list(modes), False

    def sample(self):
        return TelemetrySample("jtop", 10.0, 0.5, 0.25, 50.0, self.modes.pop(0) if len(self.modes) > 1 else
                               self.modes[0], 0.0)

    def close(self):
        self.closed = True


def test_reports_reach_the_cloud_and_a_power_mode_change_reprofiles(tiny_checkpoint, tmp_path):
    with running_cloud(tiny_checkpoint("llama3"), 2, 1, tmp_path, metrics_address="127.0.0.1:0") as cluster:
        with cluster.generator(device_id="jetson-7") as generator:
            before = generator.prefill.profile
            reporter = TelemetryReporter(_Modes(["MAXN", "15W"]), generator.link.report_telemetry, 0.05,
                                         lambda old, new: generator.request_reprofile())
            reporter.report_once()
            assert reporter.sent == 1 and generator.prefill.profile is before
            reporter.report_once()  # the mode changed: the next generation profiles the parts afresh
            generator.generate_ids([5, 6, 7, 8], 2)
            assert generator.prefill.profile is not before
            metrics = urllib.request.urlopen(f"http://{cluster.server.metrics_address}/metrics", timeout=10).read()
            text = metrics.decode()
            assert 'hat_device_power_watts{device="jetson-7"} 10.0' in text
            assert 'hat_device_power_mode_info{device="jetson-7",mode="15W",source="jtop"} 1.0' in text
            reporter.start()
            reporter.stop()
            assert reporter.sent >= 3 and reporter.source.closed
            # a report with a NaN is dropped; an unregistered device is told so
            control = generator.link._control
            bad = pb.TelemetryReport(device_id="jetson-7", power_w=math.nan, power_mode="MAXN")
            assert control.Telemetry(bad, timeout=10).registered
            assert 'mode="15W"' in urllib.request.urlopen(
                f"http://{cluster.server.metrics_address}/metrics", timeout=10).read().decode()
            assert not control.Telemetry(pb.TelemetryReport(device_id="stranger"), timeout=10).registered
