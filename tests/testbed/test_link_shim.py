"""The link shim against an echo ROUTER: propagation delay, rates, serialisation, identities, jitter, stop.

The shim never delivers early, so lower bounds are checked on every sample; upper bounds on the best
or the median of a few, since this machine is shared and a sample can be held up by the scheduler.
The delay model itself is checked exactly, with made-up clock readings.
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


def attempts(count: int = 3):
    """Yield attempt numbers; a timing check that misses only on a burst of machine noise passes on a later one.
    Use as: for last in attempts(): ...; if ok or last: assert ...; break"""
    for number in range(count):
        yield number == count - 1


def test_small_messages_take_the_round_trip_time(echo):
    """Tiny messages take the emulated round trip: never less, and the median within 5% (one of three runs, so
    that a burst of noise on this shared machine does not fail it)."""
    for last in attempts():
        with LinkShim(echo.address, LinkProfile(INF, INF, rtt_s=0.02)) as shim:
            client = Client(shim.address)
            client.round_trip(0)  # connects the shim to the server
            rtts = [client.round_trip(tag) for tag in range(1, 26)]
            client.close()
            stats = shim.stats()
        assert min(rtts) >= 0.02
        assert (stats.up_messages, stats.down_messages, stats.devices, stats.pending) == (26, 26, 1, 0)
        assert stats.up_bytes == 26 * _REQUEST.size
        if within(statistics.median(rtts), 0.02) or last:
            assert within(statistics.median(rtts), 0.02), rtts
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
