"""Per-device limits on the devices' data plane: a message rate (a token bucket per connection) and a number of
open sessions per device id, so one device, faulty or hostile, cannot crowd out the others."""
from __future__ import annotations

import time
from dataclasses import dataclass

from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError

FRAME_OVERHEAD_BYTES = 64 << 10  # room above the largest tensor frame for anything else a peer may send in one frame


@dataclass(frozen=True, slots=True)
class DeviceLimitsConfig:
    messages_per_s: float = 2000.0  # a connection's sustained message rate; beyond it, OVERLOADED (0 = no limit)
    burst: int = 500  # messages a connection may send at once above the rate
    sessions_per_device: int = 64  # sessions one device id may hold open; an OPEN beyond it is OVERLOADED

    def __post_init__(self):
        if self.messages_per_s < 0 or self.burst < 1 or self.sessions_per_device < 1:
            raise ValueError(f"device limits must be positive (messages_per_s may be 0 for none): {self}")


class DeviceLimits:
    """Checked on the data plane's thread for each device message (not thread-safe by design)."""

    def __init__(self, config: DeviceLimitsConfig, retry_after_ms: int, clock=time.monotonic):
        self.config, self.retry_after_ms, self._clock = config, retry_after_ms, clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # connection -> (tokens, last refill)
        self.refusals = 0  # messages refused for rate or session count

    def check_rate(self, owner: bytes) -> None:
        """Take one message from the connection's bucket; WireError OVERLOADED when it is empty."""
        c = self.config
        if not c.messages_per_s:
            return
        now = self._clock()
        tokens, last = self._buckets.get(owner, (float(c.burst), now))
        tokens = min(float(c.burst), tokens + (now - last) * c.messages_per_s)
        if tokens < 1.0:
            self._buckets[owner] = (tokens, now)
            self.refusals += 1
            raise WireError(pb.OVERLOADED, f"this connection sends more than {c.messages_per_s:g} messages/s; slow down",
                            retry_after_ms=max(1, int(1000 / c.messages_per_s)))
        self._buckets[owner] = (tokens - 1.0, now)
        if len(self._buckets) > 65536:  # forget connections idle long enough to have a full bucket again
            full_after = c.burst / c.messages_per_s
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}

    def check_sessions(self, device_id: str, open_sessions: int) -> None:
        """Before an OPEN of a new session: WireError OVERLOADED when the device holds its limit."""
        if open_sessions >= self.config.sessions_per_device:
            self.refusals += 1
            raise WireError(pb.OVERLOADED, f"device {device_id!r} holds its limit of {self.config.sessions_per_device} "
                                           "open sessions", retry_after_ms=self.retry_after_ms)


def max_frame_bytes(max_tokens_per_message: int, hidden_size: int) -> int:
    """ZMQ_MAXMSGSIZE for a device-facing socket: libzmq drops a peer that sends a bigger frame before it is
    buffered whole (the decoder's own limits apply only to what arrives)."""
    return max_tokens_per_message * hidden_size * 4 + FRAME_OVERHEAD_BYTES
