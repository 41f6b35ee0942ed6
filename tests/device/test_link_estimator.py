"""Online link estimates (hat.device.link_estimator) from the timestamps of a simulated data plane: FIFO uplink and
downlink of known rates and one-way delays, a cloud whose clock runs at an unknown offset from the device's, and a
device that sometimes reads its replies late."""
from __future__ import annotations

import random

import pytest

from hat.common import wire
from hat.common.proto import hat_pb2 as pb
from hat.device.link_estimator import LinkEstimator

TINY = 64  # bytes of a message without a tensor (OPEN, OPENED)
UP_BYTES, DOWN_BYTES = 100_000, 80_000  # a prompt chunk's hidden states each way


class SimulatedLink:
    """Device <-> cloud: each direction a FIFO link of `rate` bytes/s followed by a fixed one-way delay; the cloud
    serves requests in order, `cloud_s` each. All state is in the device's clock; the cloud stamps its own,
    `offset_s` ahead."""

    def __init__(self, up_rate: float, down_rate: float, up_delay_s: float = 0.012, down_delay_s: float = 0.008,
                 offset_s: float = 12345.678, cloud_s: float = 1e-3):
        self.up_rate, self.down_rate = up_rate, down_rate
        self.up_delay_s, self.down_delay_s = up_delay_s, down_delay_s
        self.offset_s, self.cloud_s = offset_s, cloud_s
        self.up_free = self.cloud_free = self.down_free = float("-inf")
        self.sequence = 0

    def request(self, sent_s: float, up_bytes: int, down_bytes: int, kind: int = pb.RESULT) -> tuple[float, dict]:
        """Send a request at device time `sent_s`; returns when its reply reaches the device and the reply's
        header fields (cloud clock, microseconds)."""
        up_end = max(sent_s, self.up_free) + up_bytes / self.up_rate
        self.up_free = up_end
        arrival = up_end + self.up_delay_s
        replied = max(arrival, self.cloud_free) + self.cloud_s
        self.cloud_free = replied
        down_end = max(replied, self.down_free) + down_bytes / self.down_rate
        self.down_free = down_end
        self.sequence += 1
        stamps = dict(arrival_us=round((arrival + self.offset_s) * 1e6), sent_us=round((replied + self.offset_s) * 1e6))
        return down_end + self.down_delay_s, dict(kind=kind, sequence=self.sequence, **stamps)


def reply(fields: dict, request_sent_s: float, received_s: float, punctual: bool = True) -> wire.DataMessage:
    header = wire.make_header(fields["kind"], "session", fields["sequence"], arrival_us=fields["arrival_us"],
                              sent_us=fields["sent_us"])
    return wire.DataMessage(header, None, request_sent_s=request_sent_s, received_s=received_s, punctual=punctual)


def open_session(estimator: LinkEstimator, link: SimulatedLink, at_s: float) -> float:
    """A session's OPEN at device time `at_s`, answered and taken punctually; returns when the OPENED arrived."""
    arrives, fields = link.request(at_s, TINY, TINY, kind=pb.OPENED)
    estimator.on_open(reply(fields, at_s, arrives))
    return arrives


def train(estimator: LinkEstimator, link: SimulatedLink, at_s: float, count: int, gap_s: float = 0.0,
          up_bytes: int = UP_BYTES, down_bytes: int = DOWN_BYTES) -> float:
    """`count` requests sent `gap_s` apart from `at_s` (0: all at once, back to back on the uplink), replies read as
    they arrive; returns when the last reply arrived."""
    arrivals = []
    for i in range(count):
        sent = at_s + i * gap_s
        arrives, fields = link.request(sent, up_bytes, down_bytes)
        arrivals.append((sent, arrives, fields))
    for sent, arrives, fields in arrivals:
        estimator.on_reply(reply(fields, sent, arrives), up_bytes, down_bytes)
    return arrivals[-1][1]


def assert_rates(estimator: LinkEstimator, link: SimulatedLink, rel: float = 0.05) -> None:
    estimate = estimator.estimate
    assert estimate.uplink_bytes_per_s == pytest.approx(link.up_rate, rel=rel)
    assert estimate.downlink_bytes_per_s == pytest.approx(link.down_rate, rel=rel)


# --------------------------------------------------------------------------------------- tests


def test_priors_before_any_traffic():
    """A fresh estimator reports its priors."""
    estimate = LinkEstimator(prior_uplink_bytes_per_s=3e6, prior_downlink_bytes_per_s=7e6, prior_rtt_s=0.05).estimate
    rates = (estimate.uplink_bytes_per_s, estimate.downlink_bytes_per_s, estimate.rtt_s)
    assert rates == pytest.approx((3e6, 7e6, 0.05))


def test_back_to_back_train_recovers_rates_and_rtt():
    """After an OPEN, a train of back-to-back chunks gives both rates within 5% and the round trip (one-way delays
    plus the OPEN's tiny transfers) within 0.1 ms."""
    link = SimulatedLink(up_rate=3e6, down_rate=25e6)
    estimator = LinkEstimator()
    opened = open_session(estimator, link, at_s=1000.0)
    assert estimator.estimate.rtt_s == pytest.approx(link.up_delay_s + link.down_delay_s, abs=1e-4)
    train(estimator, link, opened, count=20)
    assert_rates(estimator, link)
    assert estimator.estimate.rtt_s == pytest.approx(0.020, abs=1e-4)


@pytest.mark.parametrize("offset_s", [-900.0, -0.5, 0.0, 12345.678, 3.3e6])
def test_clock_offset_does_not_matter(offset_s):
    """The same traffic gives the same estimates whatever the offset between the cloud's clock and the device's."""
    estimates = []
    for offset in (0.0, offset_s):
        link = SimulatedLink(up_rate=6e6, down_rate=2e6, offset_s=offset)
        estimator = LinkEstimator()
        train(estimator, link, open_session(estimator, link, at_s=1000.0), count=20)
        assert_rates(estimator, link)
        estimates.append(estimator.estimate)
    reference, shifted = estimates
    assert shifted.uplink_bytes_per_s == pytest.approx(reference.uplink_bytes_per_s, rel=1e-3)
    assert shifted.downlink_bytes_per_s == pytest.approx(reference.downlink_bytes_per_s, rel=1e-3)
    assert shifted.rtt_s == pytest.approx(reference.rtt_s, abs=2e-6)


@pytest.mark.parametrize("seed", range(4))
def test_late_reads_do_not_corrupt_the_downlink_rate(seed):
    """When the device is busy and reads replies after they arrived (punctual=False), the rates stay within 5%;
    taking those read times for arrivals would be far off."""
    rng = random.Random(seed)
    link, naive_link = SimulatedLink(up_rate=8e6, down_rate=4e6), SimulatedLink(up_rate=8e6, down_rate=4e6)
    estimator, naive = LinkEstimator(), LinkEstimator()
    opened = open_session(estimator, link, at_s=1000.0)
    open_session(naive, naive_link, at_s=1000.0)
    late = 0
    for _ in range(3):  # three prompts, each a train of chunks; the device works on each reply it takes
        sent = opened + 0.5
        arrivals = [link.request(sent, UP_BYTES, DOWN_BYTES) for _ in range(16)]
        for _ in range(16):
            naive_link.request(sent, UP_BYTES, DOWN_BYTES)
        ready = sent
        for arrives, fields in arrivals:
            received = max(arrives, ready)
            punctual = arrives >= ready  # the device was already waiting when it came
            late += not punctual
            estimator.on_reply(reply(fields, sent, received, punctual), UP_BYTES, DOWN_BYTES)
            naive.on_reply(reply(fields, sent, received, True), UP_BYTES, DOWN_BYTES)
            ready = received + rng.choice([0.0, 0.05])  # the output part over this reply, sometimes slow
        opened = link.down_free + 1.0
    assert late >= 10
    assert_rates(estimator, link)
    assert abs(naive.estimate.downlink_bytes_per_s / link.down_rate - 1) > 0.1


def test_messages_far_apart_give_the_right_rate():
    """Requests sent a second apart (each link idle before each message) still give both rates within 5%."""
    link = SimulatedLink(up_rate=2e6, down_rate=15e6)
    estimator = LinkEstimator()
    opened = open_session(estimator, link, at_s=1000.0)
    train(estimator, link, opened + 1.0, count=20, gap_s=1.0)
    assert_rates(estimator, link)


def test_reply_without_timestamps_changes_nothing():
    """A reply from a cloud that does not stamp (arrival_us=0, with or without sent_us) leaves every estimate as it
    was, as does an unstamped OPENED."""
    link = SimulatedLink(up_rate=3e6, down_rate=9e6)
    estimator = LinkEstimator()
    opened = open_session(estimator, link, at_s=1000.0)
    end = train(estimator, link, opened, count=10)
    before = estimator.estimate
    unstamped = dict(kind=pb.RESULT, sequence=99, arrival_us=0, sent_us=0)
    estimator.on_reply(reply(unstamped, end + 1.0, end + 1.5), 10**6, 10**6)
    half_stamped = dict(unstamped, sent_us=round((end + 1.2 + link.offset_s) * 1e6))  # no arrival stamp
    estimator.on_reply(reply(half_stamped, end + 1.0, end + 1.5), 10**6, 10**6)
    estimator.on_open(reply(dict(unstamped, kind=pb.OPENED), end + 2.0, end + 2.5))
    assert estimator.estimate == before


def test_replies_before_an_open_change_nothing():
    """Without an OPEN to fix the clock offset, replies are not measured: the estimate stays at the priors."""
    link = SimulatedLink(up_rate=3e6, down_rate=9e6)
    estimator = LinkEstimator()
    before = estimator.estimate
    train(estimator, link, 1000.0, count=10)
    assert estimator.estimate == before


def test_rates_follow_a_change_of_the_link():
    """When the link's rates change, a dozen back-to-back chunks bring both estimates within 5% of the new rates."""
    link = SimulatedLink(up_rate=5e6, down_rate=8e6)
    estimator = LinkEstimator()
    end = train(estimator, link, open_session(estimator, link, at_s=1000.0), count=20)
    assert_rates(estimator, link)
    link.up_rate, link.down_rate = 2e6, 20e6
    end = train(estimator, link, end + 0.1, count=3)
    moved = estimator.estimate
    assert moved.uplink_bytes_per_s < 4e6 and moved.downlink_bytes_per_s > 12e6  # already well on its way
    train(estimator, link, end + 0.1, count=9)
    assert_rates(estimator, link)


def test_new_session_open_refixes_the_round_trip_and_keeps_the_rates():
    """A later session's punctual OPENED re-fixes both offsets, even after a jump of the cloud's clock: the round trip
    becomes the new path's, and the rates learnt so far are kept."""
    link = SimulatedLink(up_rate=4e6, down_rate=6e6)
    estimator = LinkEstimator()
    end = train(estimator, link, open_session(estimator, link, at_s=1000.0), count=20)
    rates = estimator.estimate
    link.offset_s = -500.0  # the cloud now runs on another host's clock
    link.up_delay_s, link.down_delay_s = 0.030, 0.030  # over a longer path
    opened = open_session(estimator, link, end + 1.0)
    estimate = estimator.estimate
    assert estimate.rtt_s == pytest.approx(0.060, abs=1e-4)
    assert (estimate.uplink_bytes_per_s, estimate.downlink_bytes_per_s) == (rates.uplink_bytes_per_s,
                                                                            rates.downlink_bytes_per_s)
    train(estimator, link, opened, count=5)
    assert_rates(estimator, link)


def test_late_read_opened_does_not_inflate_the_round_trip():
    """An OPENED read late (the device was computing the first chunk) keeps the downlink offset of the last session,
    so the round trip and the next rates are not inflated by the device's delay."""
    link = SimulatedLink(up_rate=4e6, down_rate=6e6)
    estimator = LinkEstimator()
    end = train(estimator, link, open_session(estimator, link, at_s=1000.0), count=20)
    at = end + 1.0
    arrives, fields = link.request(at, TINY, TINY, kind=pb.OPENED)
    estimator.on_open(reply(fields, at, arrives + 0.25, punctual=False))
    assert estimator.estimate.rtt_s == pytest.approx(0.020, abs=1e-4)
    train(estimator, link, arrives, count=10)
    assert_rates(estimator, link)


def test_first_late_read_opened_fixes_the_uplink_only():
    """A first OPENED read late sets the uplink's offset (the cloud stamps arrivals) but not the downlink's (the read
    delay would be taken for latency): the uplink rate is measured, the downlink keeps its prior, and the round trip
    is the late read's upper bound (true 20 ms + 10 ms late, nearer than the 500 ms prior), until a reply taken
    punctually (the CLOSED) gives the downlink's offset."""
    link = SimulatedLink(up_rate=4e6, down_rate=6e6)
    estimator = LinkEstimator(prior_downlink_bytes_per_s=1e6, prior_rtt_s=0.5)
    arrives, fields = link.request(1000.0, TINY, TINY, kind=pb.OPENED)
    estimator.on_open(reply(fields, 1000.0, arrives + 0.01, punctual=False))
    end = train(estimator, link, arrives + 0.01, count=20)
    assert estimator.estimate.uplink_bytes_per_s == pytest.approx(link.up_rate, rel=0.05)
    assert estimator.estimate.downlink_bytes_per_s == 1e6
    assert estimator.estimate.rtt_s == pytest.approx(0.030, abs=1e-3)
    at = end + 0.1
    arrives, fields = link.request(at, TINY, TINY, kind=pb.CLOSED)
    estimator.on_close(reply(fields, at, arrives))
    assert estimator.estimate.rtt_s == pytest.approx(0.020, abs=1e-3)
    train(estimator, link, open_session(estimator, link, arrives + 1.0), count=20)
    assert_rates(estimator, link)


def test_first_late_read_opened_does_not_corrupt_the_downlink_rate():
    """After a first OPENED read 10 ms late (its delay is not latency), the downlink is not measured at all, rather
    than measured wrong: it stays at its prior until a punctual reply fixes its offset."""
    link = SimulatedLink(up_rate=4e6, down_rate=6e6)  # the uplink (25 ms a chunk) spaces the replies out
    estimator = LinkEstimator(prior_downlink_bytes_per_s=5e6)
    arrives, fields = link.request(1000.0, TINY, TINY, kind=pb.OPENED)
    estimator.on_open(reply(fields, 1000.0, arrives + 0.01, punctual=False))
    train(estimator, link, arrives + 0.01, count=20)
    assert estimator.estimate.downlink_bytes_per_s == 5e6


def test_late_read_opened_after_the_cloud_clock_moved_back():
    """A cloud whose clock moved 50 s back (another host, a reboot) and a late-read OPENED: the uplink is measured
    right at once; the downlink and round trip are right again after the generation's CLOSED."""
    link = SimulatedLink(up_rate=4e6, down_rate=6e6)
    estimator = LinkEstimator()
    end = train(estimator, link, open_session(estimator, link, at_s=1000.0), count=20)
    link.offset_s -= 50.0
    at = end + 1.0
    arrives, fields = link.request(at, TINY, TINY, kind=pb.OPENED)
    estimator.on_open(reply(fields, at, arrives + 0.05, punctual=False))
    end = train(estimator, link, arrives + 0.05, count=20)
    assert estimator.estimate.uplink_bytes_per_s == pytest.approx(link.up_rate, rel=0.05)
    arrives, fields = link.request(end + 0.1, TINY, TINY, kind=pb.CLOSED)
    estimator.on_close(reply(fields, end + 0.1, arrives))
    assert estimator.estimate.rtt_s == pytest.approx(0.020, abs=1e-3)
    train(estimator, link, open_session(estimator, link, arrives + 1.0), count=20)
    assert_rates(estimator, link)


def test_late_reads_bound_the_round_trip_by_the_least_lateness():
    """Sessions whose OPENED and CLOSED are all read late (a busy device): the round trip is the true one plus the
    least lateness seen (never the prior), and a punctual reply then gives the true one."""
    link = SimulatedLink(up_rate=4e6, down_rate=6e6)
    estimator = LinkEstimator(prior_rtt_s=0.5)
    at = 1000.0
    for late_s in (0.03, 0.004, 0.012):
        arrives, fields = link.request(at, TINY, TINY, kind=pb.OPENED)
        estimator.on_open(reply(fields, at, arrives + late_s, punctual=False))
        at = arrives + 1.0
    assert estimator.estimate.rtt_s == pytest.approx(0.020 + 0.004, abs=1e-4)
    arrives, fields = link.request(at, TINY, TINY, kind=pb.CLOSED)
    estimator.on_close(reply(fields, at, arrives))
    assert estimator.estimate.rtt_s == pytest.approx(0.020, abs=1e-4)
