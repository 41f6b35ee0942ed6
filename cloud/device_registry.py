"""Devices registered over the control plane, checked against the cloud bundle they must match, and the newest
telemetry each reports (served as per-device gauges on /metrics)."""
from __future__ import annotations

import logging
import math
import threading

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from hat.common.bundle import BundleManifest, BundleMismatchError, check_compatible
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import MAX_ID_CHARS

log = logging.getLogger("hat.cloud")
TELEMETRY_GAUGES = (  # (metric, TelemetryReport field, help)
    ("hat_device_power_watts", "power_w", "board power a device reported, watts (0: no reading)"),
    ("hat_device_cpu_load", "cpu_load", "CPU load a device reported, 0..1"),
    ("hat_device_gpu_load", "gpu_load", "GPU load a device reported, 0..1 (negative: no reading)"),
    ("hat_device_temperature_celsius", "temperature_c", "hottest sensor a device reported (0: no reading)"),
)


class DeviceRegistry:
    def __init__(self, manifest: BundleManifest):
        self._manifest = manifest
        self._devices: dict[str, pb.RegisterRequest] = {}
        self._telemetry: dict[str, pb.TelemetryReport] = {}  # device id -> newest report
        self._lock = threading.Lock()

    def register(self, request: pb.RegisterRequest) -> str | None:
        """Record the device; returns None when accepted, else the reason it is refused."""
        if not request.device_id:
            return "registration needs a device id"
        if len(request.device_id) > MAX_ID_CHARS:
            return f"device id longer than {MAX_ID_CHARS} characters"
        try:
            check_compatible(fingerprint=request.fingerprint, num_layers=request.num_layers,
                             input_layers=request.input_layers, output_layers=request.output_layers,
                             cloud=self._manifest)
        except BundleMismatchError as exc:
            log.warning("refused device %s: %s", request.device_id, exc,
                        extra={"device": request.device_id, "event": "device_refused"})
            return str(exc)
        with self._lock:
            self._devices[request.device_id] = request
        log.info("registered device %s (%s, %s)", request.device_id, request.capabilities.platform or "unknown platform",
                 request.capabilities.backend or "unknown backend",
                 extra={"device": request.device_id, "event": "registered"})
        return None

    def reply(self, request: pb.RegisterRequest, max_context: int, max_tokens_per_message: int,
              session_idle_timeout_s: float) -> pb.RegisterReply:
        """Register the device and answer it: refused with the reason, or accepted with the cloud's facts."""
        reason = self.register(request)
        if reason is not None:
            return pb.RegisterReply(accepted=False, reason=reason)
        return pb.RegisterReply(accepted=True, cloud_dtype=self._manifest.dtype, hidden_size=self._manifest.hidden_size,
                                max_context=max_context, max_tokens_per_message=max_tokens_per_message,
                                session_idle_timeout_s=session_idle_timeout_s)

    def record_telemetry(self, report: pb.TelemetryReport) -> pb.TelemetryAck:
        """Keep a registered device's newest report; an unregistered device's is dropped (the ack says so)."""
        finite = all(math.isfinite(getattr(report, field)) for _, field, _ in TELEMETRY_GAUGES)
        with self._lock:
            known = report.device_id in self._devices
            if known and finite:  # a report with a NaN or infinity is dropped
                previous = self._telemetry.get(report.device_id)
                self._telemetry[report.device_id] = report
        if known and finite and previous is not None and previous.power_mode != report.power_mode:
            log.info("device %s power mode %s -> %s", report.device_id, previous.power_mode or "?",
                     report.power_mode or "?", extra={"device": report.device_id, "event": "power_mode"})
        return pb.TelemetryAck(registered=known)

    def telemetry_families(self) -> list[Metric]:
        """Per-device gauges (prometheus_client families), from the newest reports."""
        with self._lock:
            reports = sorted(self._telemetry.items())
        families = []
        for name, field, help_text in TELEMETRY_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["device"])
            for device, report in reports:
                family.add_metric([device], getattr(report, field))
            families.append(family)
        modes = InfoMetricFamily("hat_device_power_mode", "the device's power mode (nvpmodel name)", labels=["device"])
        for device, report in reports:
            modes.add_metric([device], {"mode": report.power_mode, "source": report.source})
        return families + [modes]

    def is_registered(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)
