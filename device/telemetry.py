"""Device telemetry: board power, CPU and GPU load, temperature and power mode.

On a Jetson it is read with jetson-stats (`from jtop import jtop`, which talks to the jtop.service
daemon). Elsewhere jtop is missing, or raises JtopException ("The jtop.service is not active"): the
agent then reads psutil (CPU load and temperatures only, no power, GPU or power mode) and says so
once. A TelemetryReporter thread samples every few seconds, sends each sample to the cloud's control
plane (`Telemetry`, shown there as per-device gauges on /metrics), and calls back when the power mode
changes: the device's compute speed changes with it, so the agent re-profiles its parts for the
chunk planner.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from hat.common.proto import hat_pb2 as pb

log = logging.getLogger("hat.device")
_CPU_KEY = re.compile(r"^CPU\d+$")
_OFFLINE_TEMPERATURE_C = -40.0  # jtop reports a switched-off sensor far below this
_fallback_said = threading.Event()  # the psutil fallback is announced once per process


@dataclass(frozen=True, slots=True)
class TelemetrySample:
    source: str  # "jtop" or "psutil"
    power_w: float  # board power, watts (0: no reading)
    cpu_load: float  # 0..1 over all cores
    gpu_load: float  # 0..1 (negative: no reading)
    temperature_c: float  # hottest sensor, Celsius (0: no reading)
    power_mode: str  # nvpmodel name ("" where there is none)
    sampled_unix_s: float  # when it was read

    def to_proto(self, device_id: str) -> pb.TelemetryReport:
        return pb.TelemetryReport(device_id=device_id, source=self.source, power_w=self.power_w,
                                  cpu_load=self.cpu_load, gpu_load=self.gpu_load, temperature_c=self.temperature_c,
                                  power_mode=self.power_mode, sampled_unix_s=self.sampled_unix_s)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # jtop writes "OFF" for a core that is off
        return None
    return number if math.isfinite(number) else None


def sample_from_jtop_stats(stats: dict) -> TelemetrySample:
    """A sample from jtop's flat `stats` dict: CPU1..n and GPU in percent, "Temp <sensor>" in Celsius, "Power TOT"
    in milliwatts, "nvp model" the power mode's name. Missing or unreadable entries count as no reading."""
    cpus = [n for key, value in stats.items() if _CPU_KEY.match(str(key)) and (n := _number(value)) is not None]
    temperatures = [n for key, value in stats.items() if str(key).startswith("Temp")
                    and (n := _number(value)) is not None and n > _OFFLINE_TEMPERATURE_C]
    gpu = _number(stats.get("GPU"))
    power_mw = _number(stats.get("Power TOT"))
    return TelemetrySample("jtop", (power_mw or 0.0) / 1000, sum(cpus) / len(cpus) / 100 if cpus else 0.0,
                           gpu / 100 if gpu is not None else -1.0, max(temperatures, default=0.0),
                           str(stats.get("nvp model") or ""), time.time())


class TelemetrySource:
    """Samples this machine: jtop when its service answers, else psutil (announced once in the log)."""

    def __init__(self):
        self._jetson = None
        self.fallback_reason = ""  # why psutil is read instead of jtop ("" when jtop is)
        try:
            from jtop import jtop
        except ImportError:
            self.fallback_reason = "jetson-stats (jtop) is not installed"
        else:
            try:
                jetson = jtop()
                jetson.start()
                self._jetson = jetson
            except Exception as exc:  # JtopException: the jtop.service is not active (not a Jetson, or stopped)
                self.fallback_reason = f"jtop: {exc}"
        if self._jetson is None:
            import psutil

            psutil.cpu_percent(interval=None)  # the first reading only starts the measurement
            if not _fallback_said.is_set():
                _fallback_said.set()
                log.warning("telemetry from psutil (%s): CPU load and temperatures only, no power, GPU or power "
                            "mode readings", self.fallback_reason)

    @property
    def source(self) -> str:
        return "jtop" if self._jetson is not None else "psutil"

    def sample(self) -> TelemetrySample:
        if self._jetson is not None:
            return sample_from_jtop_stats(dict(self._jetson.stats))
        import psutil

        temperatures = []
        for sensors in (getattr(psutil, "sensors_temperatures", dict)() or {}).values():
            temperatures += [s.current for s in sensors if _number(s.current) is not None]
        return TelemetrySample("psutil", 0.0, psutil.cpu_percent(interval=None) / 100, -1.0,
                               max(temperatures, default=0.0), "", time.time())

    def close(self) -> None:
        if self._jetson is not None:
            self._jetson.close()
            self._jetson = None


class TelemetryReporter:
    """A daemon thread: every `interval_s`, sample, send to the cloud with `send(sample)` (which must time out on its
    own), and call `on_power_mode(old, new)` when the power mode changes. `stop()` joins it within a timeout."""

    def __init__(self, source: TelemetrySource, send: Callable[[TelemetrySample], bool], interval_s: float = 5.0,
                 on_power_mode: Callable[[str, str], None] | None = None):
        if not interval_s > 0:
            raise ValueError(f"telemetry interval must be positive, got {interval_s}")
        self.source, self.send, self.interval_s, self.on_power_mode = source, send, interval_s, on_power_mode
        self.latest: TelemetrySample | None = None
        self.sent = 0  # samples the cloud took
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hat-telemetry", daemon=True)

    def start(self) -> "TelemetryReporter":
        self._thread.start()
        return self

    def report_once(self) -> TelemetrySample:
        sample = self.source.sample()
        previous, self.latest = self.latest, sample
        if previous is not None and previous.power_mode != sample.power_mode and self.on_power_mode is not None:
            log.info("power mode %s -> %s", previous.power_mode or "?", sample.power_mode or "?")
            self.on_power_mode(previous.power_mode, sample.power_mode)
        if self.send(sample):
            self.sent += 1
        return sample

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.report_once()
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry sample failed")
            self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.source.close()
