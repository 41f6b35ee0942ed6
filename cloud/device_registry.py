"""Devices registered over the control plane, checked against the cloud bundle they must match."""
from __future__ import annotations

import logging
import threading

from hat.common.bundle import BundleManifest, BundleMismatchError, check_compatible
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import MAX_ID_CHARS

log = logging.getLogger("hat.cloud")


class DeviceRegistry:
    def __init__(self, manifest: BundleManifest):
        self._manifest = manifest
        self._devices: dict[str, pb.RegisterRequest] = {}
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
        log.info("registered device %s (%s)", request.device_id, request.capabilities.platform or "unknown platform",
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

    def is_registered(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)
