"""The link shim against an echo ROUTER: propagation delay, rates, serialisation, identities, jitter, stop,
bandwidth traces, a port per profile; and scripts/check_link_emulator.py's quick run (within 5%).

The shim never delivers early, so lower bounds are checked on every sample; upper bounds on the best
or the median of a few, since this machine is shared and a sample can be held up by the scheduler.
The delay model and the traces are checked exactly, with made-up clock readings.
"""
from __future__ import annotations

import os
import statistics
import struct
import threading
import time

import pytest
import zmq

from hat.testbed.link_shim import LinkModel, LinkProfile, LinkShim
from hat.testbed.link_traces import BandwidthTrace, wifi_like_trace
from script_loader import load_script


INF = float("inf")
SLACK_S = 0.0005  # loopback and scheduling overhead allowed on top of the relative tolerance
REPLY_TIMEOUT_MS = 5000
_REQUEST = struct.Struct("<QQ")  # (tag, size of the reply payload)


class EchoServer:
    """A ROUTER in a thread: answers each [request, payload?] with [request, bytes(size)]; records routing ids."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:0")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(20, zmq.POLLIN):
                continue
            owner, request, *_ = self.socket.recv_multipart()
            self.seen.append(owner)
            _, size = _REQUEST.unpack(request)
            self.socket.send_multipart([owner, request, bytes(size)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture()
def echo():
    server = EchoServer()
    yield server
    server.close()


class Client:
    """A device-like DEALER with its own random 16-byte routing id."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.routing_id = os.urandom(16)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, self.routing_id)
        self.socket.connect(address)

    def send(self, tag: int, payload_bytes: int = 0, reply_bytes: int = 0) -> None:
        frames = [_REQUEST.pack(tag, reply_bytes)]
        if payload_bytes:
            frames.append(bytes(payload_bytes))
        self.socket.send_multipart(frames)

    def receive(self) -> tuple[int, int]:
        """(tag, reply payload bytes) of the next reply."""
        assert self.socket.poll(REPLY_TIMEOUT_MS, zmq.POLLIN), "no reply through the shim"
        request, payload = self.socket.recv_multipart()
        return _REQUEST.unpack(request)[0], len(payload)

    def round_trip(self, tag: int, payload_bytes: int = 0, reply_bytes: int = 0) -> float:
        began = time.perf_counter()
        self.send(tag, payload_bytes, reply_bytes)
        assert self.receive() == (tag, reply_bytes)
        return time.perf_counter() - began

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def within(measured: float, expected: float, relative: float = 0.05) -> bool:
    return abs(measured - expected) <= relative * expected + SLACK_S


def attempts(count: int = 3, pause_s: float = 2.0):
    """Yield whether each attempt is the last; a timing check that misses only on a burst of machine noise passes on
    a later one, `pause_s` times the attempt's number later (such bursts on this shared machine last seconds).
    Use as: for last in attempts(): ...; if ok or last: assert ...; break"""
    for number in range(count):
        if number:
            time.sleep(pause_s * number)
        yield number == count - 1


def test_small_messages_take_the_round_trip_time(echo):
    """Tiny messages take the emulated round trip: never less, and the median, less what the same messages cost
    through a shim that emulates nothing (measured in the same attempt, each after the same 20 ms of idling: an
    idled path wakes slowly on this VM), within 5% (one of three runs, so that a burst of noise on this shared
    machine does not fail it)."""
    for last in attempts():
        with LinkShim(echo.address, LinkProfile(INF, INF, rtt_s=0.0)) as bare:
            client = Client(bare.address)
            client.round_trip(0)
            floor = []
            for tag in range(1, 26):
                time.sleep(0.02)
                floor.append(client.round_trip(tag))
            client.close()
        with LinkShim(echo.address, LinkProfile(INF, INF, rtt_s=0.02)) as shim:
            client = Client(shim.address)
            client.round_trip(0)  # connects the shim to the server
            rtts = [client.round_trip(tag) for tag in range(1, 26)]
            client.close()
            stats = shim.stats()
        assert min(rtts) >= 0.02
        assert (stats.up_messages, stats.down_messages, stats.devices, stats.pending) == (26, 26, 1, 0)
        assert stats.up_bytes == 26 * _REQUEST.size
        emulated = statistics.median(rtts) - statistics.median(floor)
        if within(emulated, 0.02) or last:
            assert within(emulated, 0.02), (rtts, floor)
            break


def _transport_floor(echo) -> tuple[float, float]:
    """Best round trips of a 1 MB request and a 1.5 MB reply through a shim that emulates nothing (unlimited
    rates, no delay): what moving those bytes over loopback costs on this machine, on top of any emulation."""
    with LinkShim(echo.address, LinkProfile(INF, INF, rtt_s=0.0)) as shim:
        client = Client(shim.address)
        client.round_trip(0)
        up = min(client.round_trip(1, payload_bytes=1_000_000) for _ in range(3))
        down = min(client.round_trip(2, reply_bytes=1_500_000) for _ in range(3))
        client.close()
    return up, down


def test_rates_serialise_messages(echo):
    """Emulated transfer times are never early and match the setting within 5% once the loopback's own cost of
    moving the same bytes, measured in the same test, is set aside (one of three runs: noise bursts happen here)."""
    for last in attempts():
        rtt = 0.02
        up_floor, down_floor = _transport_floor(echo)
        profile = LinkProfile(uplink_bytes_per_s=5e6, downlink_bytes_per_s=15e6, rtt_s=rtt)
        ups, downs, firsts, gaps = [], [], [], []
        with LinkShim(echo.address, profile) as shim:
            client = Client(shim.address)
            client.round_trip(0)
            for _ in range(3):
                ups.append(client.round_trip(1, payload_bytes=1_000_000))
                downs.append(client.round_trip(2, reply_bytes=1_500_000))
                began = time.perf_counter()
                client.send(3, payload_bytes=500_000)
                client.send(4, payload_bytes=500_000)
                assert client.receive() == (3, 0)
                first = time.perf_counter()
                assert client.receive() == (4, 0)
                firsts.append(first - began)
                gaps.append(time.perf_counter() - first)
            client.close()
        assert min(ups) >= 1_000_000 / 5e6 + rtt and min(downs) >= 1_500_000 / 15e6 + rtt
        assert min(firsts) >= 500_000 / 5e6 + rtt
        checks = [(min(ups) - up_floor, 1_000_000 / 5e6 + rtt), (min(downs) - down_floor, 1_500_000 / 15e6 + rtt),
                  (min(firsts) - up_floor / 2, 500_000 / 5e6 + rtt), (statistics.median(gaps), 500_000 / 5e6)]
        if all(within(measured, expected) for measured, expected in checks) or last:
            for measured, expected in checks:
                assert within(measured, expected), (checks, ups, downs, firsts, gaps, up_floor, down_floor)
            break


def test_devices_keep_their_identities_and_replies(echo):
    with LinkShim(echo.address, LinkProfile(INF, INF, rtt_s=0.004)) as shim:
        clients = [Client(shim.address), Client(shim.address)]
        for round_ in range(5):
            for index, client in enumerate(clients):
                client.send(100 * index + round_, reply_bytes=index + 1)
            for index, client in enumerate(clients):
                assert client.receive() == (100 * index + round_, index + 1)
        for client in clients:
            assert not client.socket.poll(50, zmq.POLLIN)  # nothing else came back
            client.close()
        assert shim.stats().devices == 2
    assert set(echo.seen) == {client.routing_id for client in clients}


def test_jitter_stays_in_bounds_and_keeps_order(echo):
    """Jitter adds up to its bound per direction, never reorders, and is there (one of three runs within bounds)."""
    rtt, jitter = 0.02, 0.01
    for last in attempts():
        with LinkShim(echo.address, LinkProfile(INF, INF, rtt_s=rtt, jitter_s=jitter, seed=7)) as shim:
            client = Client(shim.address)
            client.round_trip(0)
            rtts = [client.round_trip(tag) for tag in range(1, 21)]
            for tag in range(100, 130):
                client.send(tag)
            replies = [client.receive()[0] for _ in range(30)]
            client.close()
        assert min(rtts) >= rtt, rtts
        assert replies == list(range(100, 130))
        in_bounds = sum(value <= rtt + 2 * jitter + 0.001 for value in rtts) >= 0.9 * len(rtts)
        if in_bounds or last:
            assert in_bounds, rtts
            assert max(rtts) - min(rtts) > jitter / 2, rtts  # the jitter is there
            break


def test_stop_ends_the_process(echo):
    shim = LinkShim(echo.address, LinkProfile(INF, INF, rtt_s=0.0))
    shim.start()
    assert shim.is_alive() and shim.port and shim.address.endswith(f":{shim.port}")
    client = Client(shim.address)
    client.round_trip(1)
    client.close()
    began = time.monotonic()
    shim.stop()
    assert not shim.is_alive()
    assert shim._process.exitcode == 0  # it left on the stop message, not by terminate or kill
    assert time.monotonic() - began < 5.0
    with pytest.raises(RuntimeError, match="not running"):
        shim.stats()
    shim.stop()  # a second stop is harmless


def test_a_bad_cloud_address_fails_at_start():
    with pytest.raises(RuntimeError, match="failed to start"):
        LinkShim("nonsense://nowhere", LinkProfile(INF, INF, rtt_s=0.0)).start()


def test_profile_is_checked():
    with pytest.raises(ValueError):
        LinkProfile(0.0, INF, rtt_s=0.01)
    with pytest.raises(ValueError):
        LinkProfile(INF, INF, rtt_s=-1.0)


def test_model_serialises_each_direction_of_each_device():
    model = LinkModel(LinkProfile(uplink_bytes_per_s=1000.0, downlink_bytes_per_s=500.0, rtt_s=0.2))
    assert model.schedule(b"a", True, 100, now=10.0) == pytest.approx(10.0 + 0.1 + 0.1)
    # handed over while the first is still on the link: starts when the link is free
    assert model.schedule(b"a", True, 100, now=10.05) == pytest.approx(10.2 + 0.1)
    # the other direction and the other device have links of their own
    assert model.schedule(b"a", False, 100, now=10.05) == pytest.approx(10.05 + 0.2 + 0.1)
    assert model.schedule(b"b", True, 100, now=10.05) == pytest.approx(10.05 + 0.1 + 0.1)
    # an idle link: no leftover wait
    assert model.schedule(b"a", True, 0, now=20.0) == pytest.approx(20.1)


def test_model_jitter_stays_in_bounds_never_reorders_and_is_seeded():
    profile = LinkProfile(float("inf"), float("inf"), rtt_s=0.02, jitter_s=0.01, seed=3)
    model, again = LinkModel(profile), LinkModel(profile)
    spaced = [model.schedule(b"a", True, 10, now=float(t)) - t for t in range(200)]
    assert all(0.01 <= delay <= 0.02 for delay in spaced)
    assert max(spaced) - min(spaced) > 0.008
    assert [again.schedule(b"a", True, 10, now=float(t)) - t for t in range(200)] == spaced
    burst = [model.schedule(b"a", False, 10, now=500.0 + t * 1e-4) for t in range(200)]
    assert burst == sorted(burst)
    assert all(0.01 <= delay - 500.0 - t * 1e-4 for t, delay in enumerate(burst))


# --- bandwidth traces ---------------------------------------------------------------------------------------

def test_trace_rates_are_piecewise_constant_and_loop():
    trace = BandwidthTrace(((0.0, 10.0, 20.0), (1.0, 5.0, 40.0)), period_s=3.0)
    assert trace.rates_at(0.0) == trace.rates_at(0.999) == (10.0, 20.0)
    assert trace.rates_at(1.0) == trace.rates_at(2.999) == (5.0, 40.0)
    assert trace.rates_at(3.0) == trace.rates_at(6.5) == (10.0, 20.0)
    assert trace.rates_at(7.0) == (5.0, 40.0)
    held = BandwidthTrace([[0, 10, 20], [1, 5, 40]])  # lists are taken, the last step holds
    assert held.steps == ((0.0, 10.0, 20.0), (1.0, 5.0, 40.0)) and held.rates_at(1e6) == (5.0, 40.0)


def test_trace_splits_a_message_at_a_rate_change():
    trace = BandwidthTrace(((0.0, 10.0, 20.0), (1.0, 5.0, 40.0)), period_s=3.0)
    assert trace.transmit_end(0.5, 5, uplink=True) == pytest.approx(1.0)  # all before the change
    assert trace.transmit_end(0.5, 10, uplink=True) == pytest.approx(2.0)  # 5 bytes at 10/s, 5 more at 5/s
    assert trace.transmit_end(0.5, 30, uplink=False) == pytest.approx(1.5)  # 10 at 20/s, 20 at 40/s
    # past the period: 0.5 s at 10/s + 2 s at 5/s = 15 bytes to 3.0, then a whole period (20 bytes), then 5 at 10/s
    assert trace.transmit_end(0.5, 40, uplink=True) == pytest.approx(6.5)
    assert trace.bytes_per_period(uplink=True) == pytest.approx(20.0)
    assert trace.transmit_end(2.0, 0, uplink=True) == 2.0


@pytest.mark.parametrize("steps, period, message", [
    ((), None, "at least one step"),
    (((0.5, 1e6, 1e6),), None, "must start at 0"),
    (((0, 1e6, 1e6), (2, 1e6, 1e6), (2, 1e6, 1e6)), None, "increase strictly"),
    (((0, 1e6, 1e6), (2, 1e6, 1e6), (1, 1e6, 1e6)), None, "increase strictly"),
    (((0, 0.0, 1e6),), None, "uplink rate 0.0"),
    (((0, 1e6, -1.0),), None, "downlink rate -1.0"),
    (((0, 1e6, float("inf")),), None, "finite and positive"),
    (((0, 1e6),), None, "must be \\(start_s, uplink, downlink\\)"),
    (((0, "fast", 1e6),), None, "not a number"),
    (((0, 1e6, 1e6), (2, 1e6, 1e6)), 2.0, "period_s"),
])
def test_bad_traces_are_refused(steps, period, message):
    with pytest.raises(ValueError, match=message):
        BandwidthTrace(steps, period)


def test_traces_read_and_write_csv_in_megabytes_per_second(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("time_s,up_MBps,down_MBps\n# a comment\n0,10,15\n\n2.5, 5, 10  # from 2.5 s on\n")
    trace = BandwidthTrace.from_csv(path, period_s=4.0)
    assert trace == BandwidthTrace(((0.0, 10e6, 15e6), (2.5, 5e6, 10e6)), 4.0)
    trace.to_csv(tmp_path / "again.csv")
    assert BandwidthTrace.from_csv(tmp_path / "again.csv", period_s=4.0) == trace
    for text, message in [("", "empty"), ("time_s,up_MBps,down_MBps\n", "no rows"),
                          ("time_s,up_mbps,down_mbps\n0,1,1\n", "header must be time_s,up_MBps,down_MBps"),
                          ("time_s,up_MBps,down_MBps\n0,1\n", ":2: expected 3 values"),
                          ("time_s,up_MBps,down_MBps\n0,1,x\n", ":2: not numbers"),
                          ("time_s,up_MBps,down_MBps\n0,1,1\n0,2,2\n", "increase strictly")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            BandwidthTrace.from_csv(path)


def test_wifi_like_traces_stay_in_range_and_are_seeded():
    trace = wifi_like_trace(60.0, step_s=2.0, seed=4)
    assert len(trace.steps) == 30 and trace.steps[1][0] == 2.0 and trace.period_s is None
    assert all(5e6 <= up <= 10e6 and 10e6 <= down <= 15e6 for _, up, down in trace.steps)
    assert len({up for _, up, _ in trace.steps}) == 30  # it moves
    assert wifi_like_trace(60.0, step_s=2.0, seed=4) == trace != wifi_like_trace(60.0, step_s=2.0, seed=5)
    assert wifi_like_trace(10.0, 1.0, (1e6, 2e6), (3e6, 3e6), loop=True).period_s == 10.0
    for kwargs in [dict(duration_s=1.0, step_s=2.0), dict(duration_s=10.0, step_s=0.0),
                   dict(duration_s=10.0, uplink_range=(10e6, 5e6)), dict(duration_s=10.0, max_change=1.5)]:
        with pytest.raises(ValueError):
            wifi_like_trace(**kwargs)


def test_model_follows_a_trace_from_each_devices_first_message():
    trace = BandwidthTrace(((0.0, 1000.0, 1000.0), (1.0, 100.0, 1000.0)))
    model = LinkModel(LinkProfile.from_trace(trace, rtt_s=0.2))
    assert model.schedule(b"a", True, 500, now=10.0) == pytest.approx(10.5 + 0.1)  # trace time 0 is 10.0
    # 500 bytes at 1000/s until trace time 1.0, the other 100 at 100/s
    assert model.schedule(b"a", True, 600, now=10.5) == pytest.approx(11.0 + 1.0 + 0.1)
    assert model.schedule(b"a", False, 600, now=11.5) == pytest.approx(12.1 + 0.1)  # downlink: 1000/s
    assert model.schedule(b"b", True, 500, now=10.9) == pytest.approx(11.4 + 0.1)  # b's own time 0: 10.9
    assert model.origins == {b"a": 10.0, b"b": 10.9}


def test_profiles_and_shims_refuse_bad_inputs(echo):
    trace = BandwidthTrace(((0.0, 5e6, 10e6), (1.0, 1e6, 1e6)))
    assert LinkProfile.from_trace(trace, 0.02) == LinkProfile(5e6, 10e6, 0.02, 0.0, 0, trace)
    with pytest.raises(ValueError, match="LinkProfile.from_trace"):
        LinkProfile(1e6, 10e6, 0.02, trace=trace)  # rates that disagree with the trace
    with pytest.raises(ValueError, match="BandwidthTrace"):
        LinkProfile(1e6, 1e6, 0.02, trace=((0, 1e6, 1e6),))
    with pytest.raises(ValueError, match="at least one"):
        LinkShim(echo.address, [])
    with pytest.raises(ValueError, match="profile 1 must be a LinkProfile"):
        LinkShim(echo.address, [LinkProfile(INF, INF, 0.0), (1e6, 1e6, 0.0)])
    shim = LinkShim(echo.address, LinkProfile(INF, INF, 0.0))
    with pytest.raises(ValueError, match="profile 1 must be a LinkProfile"):
        shim.add_port("fast")
    with pytest.raises(RuntimeError, match="not running"):
        shim.addresses
    with shim:
        with pytest.raises(RuntimeError, match="before the link shim starts"):
            shim.add_port(LinkProfile(INF, INF, 0.0))


def test_each_port_gives_its_devices_its_own_profile(echo):
    """Devices on different ports of one shim process each see their port's delay and rates: never less, and the
    best of a few samples within 5% once the loopback's cost, measured through a third, pass-through port of the
    same shim, is set aside (one of three runs, as noise bursts happen here). The cloud sees every identity."""
    near = LinkProfile(uplink_bytes_per_s=8e6, downlink_bytes_per_s=2e6, rtt_s=0.01)
    far = LinkProfile(uplink_bytes_per_s=2e6, downlink_bytes_per_s=8e6, rtt_s=0.04)
    size = 400_000
    for last in attempts():
        shim = LinkShim(echo.address, [near, far])
        assert shim.add_port(LinkProfile(INF, INF, rtt_s=0.0)) == 2
        with shim:
            assert len(shim.ports) == 3 and shim.addresses[0] == shim.address and shim.port == shim.ports[0]
            clients = [Client(address) for address in shim.addresses]
            best = []
            for client in clients:
                client.round_trip(0)
                best.append((min(client.round_trip(tag) for tag in range(1, 10)),
                             min(client.round_trip(20 + tag, payload_bytes=size) for tag in range(3)),
                             min(client.round_trip(30 + tag, reply_bytes=size) for tag in range(3))))
            stats = shim.stats()
            for client in clients:
                client.close()
        assert stats.devices == 3 and set(stats.origins) == {(port, c.routing_id) for port, c in enumerate(clients)}
        assert {c.routing_id for c in clients} <= set(echo.seen)
        floor, checks = best[2], []
        for (tiny, up, down), profile in zip(best, (near, far)):
            expected = (profile.rtt_s, profile.rtt_s + size / profile.uplink_bytes_per_s,
                        profile.rtt_s + size / profile.downlink_bytes_per_s)
            assert tiny >= expected[0] and up >= expected[1] and down >= expected[2], (best, expected)
            checks += [(measured - cost, value) for measured, cost, value in zip((tiny, up, down), floor, expected)]
        if all(within(measured, expected) for measured, expected in checks) or last:
            assert all(within(measured, expected) for measured, expected in checks), (checks, floor)
            break


def test_the_check_script_quick_run_is_within_5_percent():
    """scripts/check_link_emulator.py --quick: delay and throughput at two settings, and a trace's rate switch
    (throughput before and after the step, the straddling message split at it), all within 5% (each setting
    measured up to five times)."""
    script = load_script("check_link_emulator")
    rows, floors = script.run_checks(quick=True, attempts=5, settle_s=1.0)  # a loaded CI machine can spoil three in a row
    assert {row.quantity for row in rows} >= {"uplink", "downlink", "round trip", "uplink before", "uplink after",
                                              "downlink before", "downlink after", "straddling message"}
    assert all(row.ok for row in rows), script.format_table(rows, floors)
