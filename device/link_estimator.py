"""Online estimates of the data plane from the device's own traffic: uplink and downlink rates, round trip.

Every reply carries the cloud's clock at the request's arrival and at the reply's send. A clock
offset never needs to be known: a session's OPEN (a tiny message) fixes, per direction, the constant
`C = offset + one-way latency`, and a later message's transfer time is then its arrival less C less
the moment the link could start on it (its send, or the end of the message before it on the same
link, whichever is later). Rates are the ratio of exponential moving averages of bytes and transfer
times, so big messages weigh more than small ones, whose times are mostly noise.
"""
from __future__ import annotations

from dataclasses import dataclass

from hat.common import wire

_MIN_SAMPLE_S = 2e-4  # a transfer measured shorter than this counts as this long (timer noise): a fast link


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    uplink_bytes_per_s: float  # device -> cloud
    downlink_bytes_per_s: float  # cloud -> device
    rtt_s: float  # round trip of a tiny message, cloud time excluded


class _Direction:
    """One direction's rate: EMAs of bytes and seconds, and the previous message's arrival (sender's clock)."""

    def __init__(self, prior_bytes_per_s: float, weight: float):
        self.weight = weight
        self.bytes, self.seconds = prior_bytes_per_s, 1.0  # the prior, until the first measurement
        self.samples = 0
        self.offset_s: float | None = None  # C: receiver clock at arrival - sender clock at send, for a tiny message
        self.previous_arrival_s = float("-inf")  # in the sender's clock
        self.previous_known = True  # whether previous_arrival_s is the true arrival (not a late read)

    def reset_offset(self, offset_s: float) -> None:
        self.offset_s = offset_s
        self.previous_arrival_s = float("-inf")
        self.previous_known = True

    def observe(self, sent_s: float, arrived_s: float, size: int, rate_known: bool = True) -> None:
        """A message of `size` bytes sent at `sent_s` (sender's clock) arrived at `arrived_s` (receiver's)."""
        if self.offset_s is None:
            return
        arrival = arrived_s - self.offset_s  # in the sender's clock, as if it had no transfer time
        if arrival < sent_s:  # the offset was inflated (jitter, a queue on the OPEN): the lower value is truer
            self.offset_s -= sent_s - arrival
            arrival = sent_s
        began = max(sent_s, self.previous_arrival_s)
        previous_known = self.previous_known
        # a late-read arrival is no start for the next message: that one is not measured
        self.previous_arrival_s = max(arrival, self.previous_arrival_s)
        self.previous_known = rate_known
        transfer = arrival - began
        if rate_known and previous_known:
            weight = self.weight if self.samples else 1.0  # the first measurement replaces the prior
            self.bytes += weight * (size - self.bytes)
            self.seconds += weight * (max(transfer, _MIN_SAMPLE_S) - self.seconds)
            self.samples += 1

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds


class LinkEstimator:
    def __init__(self, prior_uplink_bytes_per_s: float = 10e6, prior_downlink_bytes_per_s: float = 10e6,
                 prior_rtt_s: float = 0.02, weight: float = 0.3):
        """`weight`: of the newest measurement in the moving averages."""
        self.up = _Direction(prior_uplink_bytes_per_s, weight)
        self.down = _Direction(prior_downlink_bytes_per_s, weight)
        self.prior_rtt_s = prior_rtt_s
        self._late_down_offset_s: float | None = None  # the least downlink offset read from late replies (upper bound)

    @property
    def estimate(self) -> LinkEstimate:
        return LinkEstimate(self.up.rate, self.down.rate, self.rtt_s)

    def on_open(self, reply: wire.DataMessage) -> None:
        """The OPENED reply to a session's OPEN (a tiny message): sets both directions' offsets afresh, the
        downlink's only if the device was waiting for the reply (read late, it would overstate the latency and
        make every later downlink transfer look short); otherwise the downlink keeps its last offset."""
        self._fix_offsets(reply)

    def on_close(self, reply: wire.DataMessage) -> None:
        """The CLOSED reply ending a generation: tiny, and waited for, so a clean measure of both offsets."""
        self._fix_offsets(reply)

    def _fix_offsets(self, reply: wire.DataMessage) -> None:
        h = reply.header
        if not (h.arrival_us and h.sent_us and reply.received_s):
            return  # a cloud that does not stamp its replies: rates stay at their priors
        self.up.reset_offset(h.arrival_us / 1e6 - reply.request_sent_s)
        down_offset = reply.received_s - h.sent_us / 1e6
        if reply.punctual:
            self.down.reset_offset(down_offset)
        else:  # read late: only an upper bound on the downlink's offset
            self.down.reset_offset(self.down.offset_s)
            late = self._late_down_offset_s
            self._late_down_offset_s = down_offset if late is None else min(late, down_offset)

    @property
    def rtt_s(self) -> float:
        """The two directions' offsets hold the clock offset with opposite signs: their sum is the round trip.
        Before any punctual reply, a late one's offset stands in for the downlink's: an overstatement by the time
        the reply waited, and nearer than the prior."""
        down = self.down.offset_s if self.down.offset_s is not None else self._late_down_offset_s
        if self.up.offset_s is None or down is None:
            return self.prior_rtt_s
        return max(0.0, self.up.offset_s + down)

    def on_reply(self, reply: wire.DataMessage, up_bytes: int, down_bytes: int) -> None:
        """A reply to a request of `up_bytes` (both as counted on the wire)."""
        h = reply.header
        if not (h.arrival_us and h.sent_us and reply.received_s):
            return
        self.up.observe(reply.request_sent_s, h.arrival_us / 1e6, up_bytes)
        # the device reads a reply late when it was busy: such a time only bounds the arrival from above
        self.down.observe(h.sent_us / 1e6, reply.received_s, down_bytes, rate_known=reply.punctual)
