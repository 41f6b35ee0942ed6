"""Check the link emulator (hat.testbed.link_shim) against its settings: delay and throughput within 5%.

A live LinkShim process, one port per setting, sits between a client DEALER and a ZeroMQ ROUTER echo server (a
thread of this script) standing in for the cloud. Client and server share one clock (time.perf_counter), so
one-way delays are read directly: server receive time - client send time (up), client receive time - server
send time (down).

- Delay: tiny messages (a 13-byte header), one at a time, many of them; the median one-way and round-trip
  times (a round trip less the echo server's turnaround, which is the stand-in cloud's time, not the link's).
  Set: rtt_s / 2 per direction (rtt_s both ways) plus the header's serialisation at the set rate.
  What moving a message over loopback costs on this machine is not part of the emulation, so it is measured
  in the same attempt through a port of the same shim that emulates nothing (unlimited rates, no delay), and
  its median is subtracted: measured = median(through the setting) - median(through the pass-through port).
  On this VM a message sent after the path has idled costs 0.1-0.3 ms more than one sent back to back (the
  ZeroMQ I/O threads and vCPUs have to wake up), and an emulated delay idles the path for its whole length,
  so the floor is measured the same way: the client idles for the setting's one-way delay (rtt_s / 2)
  before each pass-through message. The back-to-back floor and the direct round trip without the shim are
  printed for scale. A setting of 0 ms has no relative error; it is held to 0.25 ms absolute instead (at
  0 ms the emulating path measured 0.08-0.11 ms more than the pass-through one on an idle machine, which failed
  a 0.1 ms allowance five times in a row; unlike a delay's relative error, it is noise of the same order as
  the idle-path wake-up above).
- Throughput: bulk messages of 256 KiB sent back to back (uplink: client to server; downlink: the server
  sends a burst on request), timed where they arrive. The link serialises them, so they arrive on a line,
  one message/rate apart; measured = message bytes / the slope of that line, taken as the median of the
  slopes between every pair of arrivals (Theil-Sen), which passes over the few arrivals a descheduled
  receiver makes late on this shared machine. Nothing is subtracted: the loopback's cost is the same for each
  message and cancels. The mean over the burst (bytes after the first / time from first to last arrival) is
  printed alongside; the pass-through port's is printed as the most this machine can emulate.
- Trace: a BandwidthTrace with one step per direction (uplink 10 -> 4 MB/s, downlink 15 -> 6 MB/s) placed
  to fall inside a message: throughput before and after the step, and the time on the link of the message
  that straddles it against the trace's split (bytes at the old rate until the step, the rest at the new
  one), the all-old and all-new times alongside for contrast. Trace time 0 is when the shim took in the
  device's first message, which the shim reports (LinkStats.origins); a message left the link at its
  arrival - rtt_s / 2 - the pass-through one-way time of a lone 256 KiB message, and the straddler's start
  and end are extrapolated from the arrivals before and after it at their own slopes.

Each setting is measured up to --attempts times (this machine is shared and noisy), the k-th attempt after
waiting (k - 1) x --settle seconds; the first attempt that passes is reported, else the last, with its
number. Exit status 1 if any check is off by more than 5%.

    python scripts/check_link_emulator.py [--quick] [--attempts 3] [--tolerance 0.05] [--settle 1]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from hat.testbed.link_shim import LinkProfile, LinkShim
from hat.testbed.link_traces import BandwidthTrace

INF = float("inf")
BULK_BYTES = 256 * 1024  # payload of a bulk message
ZERO_ABS_TOLERANCE_S = 0.00025  # a 0 ms setting's allowance, absolute: the wake-up noise of an idled path (0.1-0.3 ms)
REPLY_TIMEOUT_S = 10.0
_HEADER = struct.Struct("<BIII")  # kind, tag, count, size
_PING, _SINK, _BURST = 1, 2, 3
HEADER_BYTES = _HEADER.size


class EchoServer:
    """The stand-in cloud, a ROUTER in a thread. PING: answer with the header at once (receive and send times
    kept by tag); SINK: keep the arrival time; BURST: send `count` messages of `size` bytes back to back."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.bind("tcp://127.0.0.1:0")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received: dict[int, float] = {}  # ping tag -> receive time
        self.sent: dict[int, float] = {}  # ping tag -> reply send time
        self.sunk: list[float] = []  # arrival times of SINK messages
        self.burst_sent: list[float] = []  # when each BURST's first message was sent
        self._payloads: dict[int, bytes] = {}
        self._tags = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="echo-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(20, zmq.POLLIN):
                continue
            while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames = self.socket.recv_multipart()
                now = time.perf_counter()
                owner, header = frames[0], frames[1]
                kind, tag, count, size = _HEADER.unpack(header)
                if kind == _PING:
                    self.received[tag] = now
                    self.sent[tag] = time.perf_counter()
                    self.socket.send_multipart([owner, header])
                elif kind == _SINK:
                    self.sunk.append(now)
                elif kind == _BURST:
                    payload = self._payloads.setdefault(size, bytes(size))
                    self.burst_sent.append(time.perf_counter())
                    for index in range(count):
                        self.socket.send_multipart([owner, _HEADER.pack(_BURST, index, count, size), payload],
                                                   copy=False)

    def new_tag(self) -> int:
        """A ping tag not used before (the server keeps times by tag)."""
        return next(self._tags)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(linger=0)
        self.context.term()


class Client:
    """A device-like DEALER with a random routing id (so a new Client is a new device to the shim)."""

    def __init__(self, address: str, wait_connected: bool = False) -> None:
        """With `wait_connected`, return once the connection is up, so that a first message is taken in by the
        shim when it is sent rather than when the connection comes up."""
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.routing_id = os.urandom(16)
        self.socket.setsockopt(zmq.ROUTING_ID, self.routing_id)
        monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED) if wait_connected else None
        self.socket.connect(address)
        if monitor is not None:
            try:
                if not monitor.poll(int(REPLY_TIMEOUT_S * 1000), zmq.POLLIN):
                    raise RuntimeError("the client did not connect")
                recv_monitor_message(monitor)
            finally:
                self.socket.disable_monitor()
                monitor.close(linger=0)

    def send(self, kind: int, tag: int = 0, count: int = 0, size: int = 0, payload: bytes | None = None) -> float:
        frames = [_HEADER.pack(kind, tag, count, size)] + ([payload] if payload is not None else [])
        sent_at = time.perf_counter()
        self.socket.send_multipart(frames, copy=payload is None)
        return sent_at

    def receive(self) -> tuple[list[bytes], float]:
        if not self.socket.poll(int(REPLY_TIMEOUT_S * 1000), zmq.POLLIN):
            raise RuntimeError("no reply within the timeout")
        frames = self.socket.recv_multipart()
        return frames, time.perf_counter()

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@dataclass(frozen=True)
class Delays:
    up_s: float  # median one-way times
    down_s: float
    rtt_s: float  # median round trip (client send to client receive, less the echo server's turnaround)


@dataclass
class Row:
    setting: str
    quantity: str
    unit: str  # "ms" or "MB/s"
    set_value: float  # the setting (what the model says), in unit
    measured: float  # in unit
    tolerance: float  # largest relative error
    absolute: float | None = None  # largest absolute error instead, for a setting of 0 ms
    note: str = ""  # how `measured` was arrived at
    attempt: int = 1

    @property
    def error(self) -> float | None:
        """Relative error; None where the check is absolute."""
        return None if self.absolute is not None else (self.measured - self.set_value) / self.set_value

    @property
    def ok(self) -> bool:
        if self.absolute is not None:
            return abs(self.measured - self.set_value) <= self.absolute
        return abs(self.error) <= self.tolerance


def measure_delays(server: EchoServer, client: Client, count: int, idle_s: float = 0.0) -> Delays:
    """Medians of `count` pings, one at a time, each after `idle_s` of sleep."""
    ups, downs, rtts = [], [], []
    for _ in range(count):
        if idle_s:
            time.sleep(idle_s)
        tag = server.new_tag()
        sent_at = client.send(_PING, tag)
        frames, received_at = client.receive()
        if _HEADER.unpack(frames[0])[1] != tag:  # a late reply of an attempt that timed out
            raise RuntimeError("a reply out of turn")
        ups.append(server.received[tag] - sent_at)
        downs.append(received_at - server.sent[tag])
        rtts.append(ups[-1] + downs[-1])  # the echo server's own turnaround is not the link's
    return Delays(statistics.median(ups), statistics.median(downs), statistics.median(rtts))


def measure_bulk_one_way(server: EchoServer, client: Client, count: int) -> tuple[float, float]:
    """Median one-way times (up, down) of single bulk messages, one at a time."""
    ups, downs, payload = [], [], bytes(BULK_BYTES)
    for _ in range(count):
        arrived = len(server.sunk)
        sent_at = client.send(_SINK, 0, size=BULK_BYTES, payload=payload)
        ups.append(wait_sunk(server, arrived + 1)[arrived] - sent_at)
        client.send(_BURST, 0, 1, BULK_BYTES)
        received_at = client.receive()[1]
        downs.append(received_at - server.burst_sent[-1])
    return statistics.median(ups), statistics.median(downs)


def measure_uplink(server: EchoServer, client: Client, count: int) -> list[float]:
    """Arrival times at the server of `count` bulk messages sent back to back."""
    first = len(server.sunk)
    payload = bytes(BULK_BYTES)
    for index in range(count):
        client.send(_SINK, index, size=BULK_BYTES, payload=payload)
    return wait_sunk(server, first + count)[first:first + count]


def wait_sunk(server: EchoServer, total: int) -> list[float]:
    """The server's SINK arrival times once there are `total` of them."""
    deadline = time.perf_counter() + REPLY_TIMEOUT_S + total * BULK_BYTES / 0.5e6
    while len(server.sunk) < total:
        if time.perf_counter() > deadline:
            raise RuntimeError("the bulk uplink messages did not all arrive")
        time.sleep(0.001)
    return server.sunk


def measure_downlink(client: Client, count: int) -> list[float]:
    """Arrival times at the client of a burst of `count` bulk messages the server sends back to back."""
    client.send(_BURST, 0, count, BULK_BYTES)
    return [client.receive()[1] for _ in range(count)]


def link_gap(arrivals: list[float]) -> float:
    """The time between arrivals of messages the link carried back to back, as the median of the slopes between
    every pair of them (Theil-Sen): the link serialises them, so they arrive on a line, each one message/rate
    after the previous; a receiver descheduled on this shared machine only makes a few of them late, and the
    median of the slopes passes over those."""
    return statistics.median((arrivals[j] - arrivals[i]) / (j - i)
                             for i in range(len(arrivals)) for j in range(i + 1, len(arrivals)))


def gap_rate(arrivals: list[float], message_bytes: int) -> float:
    """The link's rate from those arrivals: message bytes / link_gap."""
    return message_bytes / link_gap(arrivals)


def span_rate(arrivals: list[float], message_bytes: int) -> float:
    """Bytes of messages 2..N / (arrival of N - arrival of 1): the mean throughput over the burst."""
    return (len(arrivals) - 1) * message_bytes / (arrivals[-1] - arrivals[0])


def rate_row(name: str, quantity: str, set_rate: float, arrivals: list[float], message_bytes: int,
             tolerance: float) -> Row:
    return Row(name, quantity, "MB/s", set_rate / 1e6, gap_rate(arrivals, message_bytes) / 1e6, tolerance,
               note=f"{len(arrivals)} msgs; mean over burst {span_rate(arrivals, message_bytes) / 1e6:.3f}")


def delay_row(name: str, quantity: str, set_s: float, raw_s: float, floor_s: float, tolerance: float,
              absolute_s: float | None) -> Row:
    return Row(name, quantity, "ms", set_s * 1e3, (raw_s - floor_s) * 1e3, tolerance,
               None if absolute_s is None else absolute_s * 1e3,
               note=f"raw {raw_s * 1e3:.3f} - floor {floor_s * 1e3:.3f}")


def bulk_count(rate: float, quick: bool) -> int:
    """Messages for about 0.5 s (quick: 0.25 s) of transfer, 8 to 40 of them."""
    target_s = 0.25 if quick else 0.5
    return 40 if rate == INF else max(8, min(40, round(rate * target_s / BULK_BYTES) + 1))


def ping_count(rtt_s: float, quick: bool) -> int:
    """Round trips for about 2 s (quick: 0.6 s), 15 to 41 of them (odd, for a plain median)."""
    budget_s = 0.6 if quick else 2.0
    return max(15, min(41, int(budget_s / max(rtt_s, 0.001)))) | 1


def label(profile: LinkProfile) -> str:
    def rate(value: float) -> str:
        return "inf" if value == INF else f"{value / 1e6:g}"
    return f"{rate(profile.uplink_bytes_per_s)}/{rate(profile.downlink_bytes_per_s)} MB/s, {profile.rtt_s * 1000:g} ms"


def check_setting(server: EchoServer, address: str, floor_client: Client, profile: LinkProfile, quick: bool,
                  tolerance: float) -> list[Row]:
    name, up, down, rtt = label(profile), profile.uplink_bytes_per_s, profile.downlink_bytes_per_s, profile.rtt_s
    pings = ping_count(rtt, quick)
    floor = measure_delays(server, floor_client, pings, idle_s=rtt / 2)
    client = Client(address)
    try:
        client.send(_PING, 0)  # the shim connects this device's link to the server
        client.receive()
        delays = measure_delays(server, client, pings)
        absolute = ZERO_ABS_TOLERANCE_S if rtt == 0 else None
        rows = [
            delay_row(name, "one-way up", rtt / 2 + HEADER_BYTES / up, delays.up_s, floor.up_s, tolerance, absolute),
            delay_row(name, "one-way down", rtt / 2 + HEADER_BYTES / down, delays.down_s, floor.down_s, tolerance,
                      absolute),
            delay_row(name, "round trip", rtt + HEADER_BYTES / up + HEADER_BYTES / down, delays.rtt_s, floor.rtt_s,
                      tolerance, absolute),
        ]
        message = HEADER_BYTES + BULK_BYTES
        if up != INF:
            arrivals = measure_uplink(server, client, bulk_count(up, quick))
            rows.append(rate_row(name, "uplink", up, arrivals, message, tolerance))
        if down != INF:
            arrivals = measure_downlink(client, bulk_count(down, quick))
            rows.append(rate_row(name, "downlink", down, arrivals, message, tolerance))
        return rows
    finally:
        client.close()


@dataclass(frozen=True)
class TraceSetting:
    """A trace with one step per direction, each timed to fall in the middle of a message: `before` messages go
    wholly at the first rate, the next straddles the step, `after` more go wholly at the second."""
    rtt_s: float = 0.02
    up: tuple[float, float] = (10e6, 4e6)
    down: tuple[float, float] = (15e6, 6e6)
    before: int = 10
    after: int = 6

    def trace(self) -> BandwidthTrace:
        message = HEADER_BYTES + BULK_BYTES
        # the uplink burst starts soon after 0, the downlink one when the burst request has reached the server
        # and come back; a few ms more each, seen here: a new connection carries its first large messages slowly
        up_step = 0.004 + (self.before + 0.5) * message / self.up[0]
        down_step = 0.5 * self.rtt_s + 0.006 + (self.before + 0.5) * message / self.down[0]
        if abs(up_step - down_step) < 1e-3:
            down_step += 1e-3
        up_first = up_step < down_step
        first, second = sorted((up_step, down_step))
        middle = (self.up[1], self.down[0]) if up_first else (self.up[0], self.down[1])
        return BandwidthTrace(((0.0, self.up[0], self.down[0]), (first, *middle), (second, self.up[1], self.down[1])))

    def profile(self) -> LinkProfile:
        return LinkProfile.from_trace(self.trace(), self.rtt_s)


def check_trace(server: EchoServer, shim: LinkShim, port: int, setting: TraceSetting, floor: Delays,
                tolerance: float) -> list[Row]:
    trace, message = setting.trace(), HEADER_BYTES + BULK_BYTES
    count = setting.before + 1 + setting.after
    client = Client(shim.addresses[port], wait_connected=True)
    try:
        # the burst request is the device's first message, its trace time 0; the uplink burst follows at once,
        # so the uplink starts at about 0 and the downlink when the request has reached the server
        client.send(_BURST, 0, count, BULK_BYTES)
        first, payload, downlink = len(server.sunk), bytes(BULK_BYTES), []
        for index in range(count):
            client.send(_SINK, index, size=BULK_BYTES, payload=payload)
        deadline = time.perf_counter() + REPLY_TIMEOUT_S + 2 * count * message / min(*setting.up, *setting.down)
        while len(downlink) < count or len(server.sunk) < first + count:  # both directions at once
            if time.perf_counter() > deadline:
                raise RuntimeError("the trace's bulk messages did not all arrive")
            if client.socket.poll(1, zmq.POLLIN):
                downlink.append(client.receive()[1])
        uplink = server.sunk[first:first + count]
        origin = shim.stats().origins[(port, client.routing_id)]
    finally:
        client.close()
    rows = []
    for direction, arrivals, rates, floor_s in (("up", uplink, setting.up, floor.up_s),
                                                ("down", downlink, setting.down, floor.down_s)):
        column = 1 if direction == "up" else 2
        step = next(step[0] for step in trace.steps if step[column] != trace.steps[0][column])
        name = f"trace {direction} {rates[0] / 1e6:g}->{rates[1] / 1e6:g} MB/s at {step * 1e3:.1f} ms"
        to_trace = origin + setting.rtt_s / 2 + floor_s  # arrival - to_trace: when it left the link, trace time
        straddler = next((index for index, at in enumerate(arrivals) if at - to_trace > step), count)
        if not (3 <= straddler <= count - 4):
            raise RuntimeError(f"{name}: the step fell at message {straddler} of {count}, not in the middle")
        before, after = arrivals[:straddler], arrivals[straddler:]
        rows.append(rate_row(name, f"{direction}link before", rates[0], before, message, tolerance))
        rows.append(rate_row(name, f"{direction}link after", rates[1], after[1:], message, tolerance))
        # the straddler's time on the link: from the end of the one before (extrapolated from all those before,
        # at their slope) to its own end (extrapolated back from all those after it, at theirs)
        gap_before, gap_after = link_gap(before), link_gap(after[1:])
        started = statistics.median(t + (len(before) - 1 - k) * gap_before for k, t in enumerate(before))
        ended = statistics.median(t - k * gap_after for k, t in enumerate(after))
        at = started - to_trace
        on_link = trace.transmit_end(at, message, direction == "up") - at
        rows.append(Row(name, "straddling message", "ms", on_link * 1e3, (ended - started) * 1e3, tolerance,
                        note=f"all old rate {message / rates[0] * 1e3:.1f}, all new {message / rates[1] * 1e3:.1f}; "
                             f"step {(step - at) * 1e3:.1f} ms in"))
    return rows


def settings(quick: bool) -> list[LinkProfile]:
    if quick:
        return [LinkProfile(5e6, 10e6, 0.02), LinkProfile(50e6, 50e6, 0.0)]
    return [LinkProfile(1e6, 1e6, 0.1), LinkProfile(5e6, 10e6, 0.02), LinkProfile(10e6, 15e6, 0.02),
            LinkProfile(50e6, 50e6, 0.0), LinkProfile(INF, INF, 0.05)]


def run_checks(quick: bool = False, attempts: int = 3, tolerance: float = 0.05, settle_s: float = 1.0,
               out=sys.stdout) -> tuple[list[Row], dict[str, float]]:
    """Measure every setting through one shim (a port each, and a pass-through port); (rows, floors). A setting
    measured again waits `settle_s` times its attempt's number first: a burst of noise on a shared machine lasts
    seconds, and an attempt right after a spoiled one is often spoiled too."""
    profiles = settings(quick)
    trace_setting = TraceSetting()
    server = EchoServer()
    passthrough = LinkProfile(INF, INF, 0.0)
    floor_client = None
    try:
        direct = Client(server.address)
        direct.send(_PING, 0)
        direct.receive()
        direct_delays = measure_delays(server, direct, 41)
        direct.close()
        with LinkShim(server.address, [passthrough, *profiles, trace_setting.profile()]) as shim:
            addresses = shim.addresses
            floor_client = Client(addresses[0])
            floor_client.send(_PING, 0)
            floor_client.receive()
            floor = measure_delays(server, floor_client, 41)
            bulk_up_s, bulk_down_s = measure_bulk_one_way(server, floor_client, 9)
            capacity_up = span_rate(measure_uplink(server, floor_client, 40), HEADER_BYTES + BULK_BYTES)
            capacity_down = span_rate(measure_downlink(floor_client, 40), HEADER_BYTES + BULK_BYTES)
            floors = {"direct round trip ms": direct_delays.rtt_s * 1e3,
                      "pass-through round trip ms": floor.rtt_s * 1e3,
                      "pass-through one-way up ms": floor.up_s * 1e3,
                      "pass-through one-way down ms": floor.down_s * 1e3,
                      "pass-through 256 KiB up ms": bulk_up_s * 1e3,
                      "pass-through 256 KiB down ms": bulk_down_s * 1e3,
                      "pass-through uplink MB/s": capacity_up / 1e6,
                      "pass-through downlink MB/s": capacity_down / 1e6}
            rows: list[Row] = []
            jobs = [(lambda a=address, p=profile: check_setting(server, a, floor_client, p, quick, tolerance))
                    for address, profile in zip(addresses[1:], profiles)]

            def trace_job() -> list[Row]:
                # the floor measured afresh for each attempt: one spoiled by a busy moment would spoil them all
                up_s, down_s = measure_bulk_one_way(server, floor_client, 9)
                return check_trace(server, shim, len(addresses) - 1, trace_setting, Delays(up_s, down_s, up_s + down_s),
                                   tolerance)

            jobs.append(trace_job)
            for job in jobs:
                for attempt in range(1, attempts + 1):
                    if attempt > 1:
                        time.sleep(settle_s * (attempt - 1))
                    try:
                        found = job()
                    except RuntimeError as error:  # a step that fell badly, a lost reply: measure again
                        print(f"attempt {attempt}: {error}", file=out)
                        if attempt == attempts:
                            raise
                        continue
                    for row in found:
                        row.attempt = attempt
                    if all(row.ok for row in found):
                        break
                rows.extend(found)
    finally:
        if floor_client is not None:
            floor_client.close()
        server.close()
    return rows, floors


def format_table(rows: list[Row], floors: dict[str, float]) -> str:
    lines = ["back-to-back floors (each delay row subtracts a floor measured after the same idle as its delay):"]
    lines += [f"  {name:<30} {value:10.3f}" for name, value in floors.items()]
    header = (f"{'setting (up/down MB/s, RTT)':<34} {'quantity':<18} {'unit':<4} {'set':>8} {'measured':>8} "
              f"{'error':>8} {'try':>3} {'ok':<4} how")
    lines += ["", header, "-" * (len(header) + 40)]
    for row in rows:
        error = f"{row.measured - row.set_value:+.3f}" if row.error is None else f"{row.error * 100:+.2f}%"
        lines.append(f"{row.setting:<34} {row.quantity:<18} {row.unit:<4} {row.set_value:8.3f} {row.measured:8.3f} "
                     f"{error:>8} {row.attempt:>3} {'ok' if row.ok else 'FAIL':<4} {row.note}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two settings and the trace, fewer samples")
    parser.add_argument("--attempts", type=int, default=3, help="tries per setting before it fails")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative error allowed")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait before a second attempt (twice that before a third, and so on)")
    args = parser.parse_args()
    began = time.perf_counter()
    rows, floors = run_checks(args.quick, args.attempts, args.tolerance, args.settle)
    print(format_table(rows, floors))
    failed = [row for row in rows if not row.ok]
    worst = max(abs(row.error) for row in rows if row.error is not None)
    print("error: relative to the setting; for a 0 ms setting, the difference in ms (allowed: "
          f"{ZERO_ABS_TOLERANCE_S * 1e3:g} ms)")
    print(f"\n{len(rows) - len(failed)}/{len(rows)} within {args.tolerance * 100:g}% (worst {worst:.2%}); "
          f"{time.perf_counter() - began:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
