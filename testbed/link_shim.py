"""A link emulator between devices and the cloud's ZeroMQ data port, started by a benchmark itself.

Devices connect their DEALER to one of `LinkShim.addresses` instead of the cloud's data port. The shim, a
separate process (so the device's torch compute cannot hold up its timers), forwards every message
to the cloud on a DEALER of its own per device, with the device's routing id, and the replies back.

What is emulated, per device and per direction: a serialising link (a message of B bytes occupies the
link for B / rate seconds after the previous one has left it) followed by a one-way propagation delay
of rtt_s / 2, plus optional seeded uniform jitter. The rate is fixed, or follows a bandwidth trace
(hat.testbed.link_traces.BandwidthTrace, piecewise-constant, optionally looping): a message on the link
when the rate changes sends its bytes at the old rate until the change and the rest at the new one.
A device's trace time starts at its first message through the shim (when the shim takes it in), so
every device sharing a profile sees the trace from its start however long it took to come up.

Per-device profiles: the shim listens on one port per profile (`LinkShim(cloud, [p0, p1, ...])`, or
`add_port(p)` before start; `.addresses[i]` goes with profile i), all served by ONE process. A port,
not a table of routing ids, picks the profile because devices draw random routing ids when they
start, so a testbed knows which address it hands each device but not its id in advance; and one
process for all of them keeps N devices from costing N shim processes on a small machine. Every device
on a port still gets a link of its own (devices on one port do not share its bandwidth).

What is not: loss, reordering, TCP dynamics (slow start, congestion control, window limits),
per-frame or per-packet overheads (only the payload bytes of the frames count), a link shared by
several devices (each device gets a link of its own), and the gRPC control plane, which is not shimmed.
Measured against its settings by scripts/check_link_emulator.py: on the 2-core development VM, throughput
within 0.3% from 1 to 50 MB/s and delays within ~3% at 20-100 ms RTT once loopback costs are set aside.
Those costs (0.2-0.6 ms per direction there, more under load, including the wake-up of idle I/O threads)
come on top of every emulated delay, so below ~10 ms RTT they exceed 5% of it.
"""
from __future__ import annotations

import heapq
import math
import multiprocessing
import random
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import zmq

from .link_traces import BandwidthTrace

START_TIMEOUT_S = 120.0  # longest wait for the shim process to bind (spawn re-imports the parent's main module; a loaded machine)
STOP_TIMEOUT_S = 5.0  # longest wait for a clean exit before the process is terminated, then killed
STATS_TIMEOUT_S = 5.0  # longest wait for the shim process to answer stats()
_IDLE_POLL_MS = 1000  # poll timeout when nothing is pending (stop and stats arrive on the pipe)
_SPIN_S = 0.0002  # the last stretch before a delivery is waited out by polling without a timeout
_UP, _DOWN = 0, 1


@dataclass(frozen=True, slots=True)
class LinkProfile:
    uplink_bytes_per_s: float  # device -> cloud rate (e.g. 10e6 for 10 MB/s); inf = unlimited
    downlink_bytes_per_s: float  # cloud -> device rate; inf = unlimited
    rtt_s: float  # round-trip propagation delay; each direction gets rtt_s / 2
    jitter_s: float = 0.0  # extra one-way delay drawn uniformly from [0, jitter_s]; never reorders a direction
    seed: int = 0  # seed of the jitter draws
    trace: BandwidthTrace | None = None  # rates over time, from each device's first message; then the two
    # rates above must be the trace's rates at 0 (LinkProfile.from_trace fills them in)

    def __post_init__(self) -> None:
        if not (self.uplink_bytes_per_s > 0 and self.downlink_bytes_per_s > 0):
            raise ValueError("link rates must be positive (inf for unlimited)")
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"rtt_s must be a finite non-negative number, not {self.rtt_s!r}")
        if not (math.isfinite(self.jitter_s) and self.jitter_s >= 0):
            raise ValueError(f"jitter_s must be a finite non-negative number, not {self.jitter_s!r}")
        if self.trace is not None:
            if not isinstance(self.trace, BandwidthTrace):
                raise ValueError(f"trace must be a BandwidthTrace, not {type(self.trace).__name__}")
            if (self.uplink_bytes_per_s, self.downlink_bytes_per_s) != self.trace.rates_at(0.0):
                fixed = (self.uplink_bytes_per_s, self.downlink_bytes_per_s)
                raise ValueError("with a trace, uplink_bytes_per_s and downlink_bytes_per_s must be the trace's "
                                 f"rates at 0 {self.trace.rates_at(0.0)}, not {fixed}: build it with "
                                 "LinkProfile.from_trace")

    @classmethod
    def from_trace(cls, trace: BandwidthTrace, rtt_s: float, jitter_s: float = 0.0, seed: int = 0) -> "LinkProfile":
        """A profile whose rates follow `trace`; its two fixed rates read as the trace's rates at 0."""
        up, down = trace.rates_at(0.0)
        return cls(up, down, rtt_s, jitter_s, seed, trace)


@dataclass(frozen=True, slots=True)
class LinkStats:
    up_messages: int  # device -> cloud messages delivered to the cloud
    up_bytes: int  # their bytes (sum of frame lengths, routing id excluded)
    down_messages: int  # cloud -> device messages delivered to devices
    down_bytes: int  # their bytes
    pending: int  # messages in flight inside the shim (both directions)
    devices: int  # distinct devices seen (a routing id on a port), all ports together
    origins: dict[tuple[int, bytes], float] = field(default_factory=dict)  # (port index, routing id) -> when
    # the shim took in that device's first message (its trace time 0), in time.perf_counter() of this machine


class LinkShim:
    """Context manager: `LinkShim(cloud_data_address, profile)`; devices connect to `.address`
    (tcp://127.0.0.1:PORT, also `.port`) instead of the cloud's data address. start()/stop().

    Several profiles, one process: `LinkShim(cloud_data_address, [profile0, profile1, ...])`, or
    `add_port(profile)` before start; a device connected to `.addresses[i]` (port `.ports[i]`) gets a link
    of its own with profile i. `.address`, `.port` and `.profile` are those of the first.

    The process is started with 'spawn', which imports the caller's main module again in the child:
    a script must keep its work under `if __name__ == "__main__":`, and a main module that imports
    torch adds its import time (seconds) to the start. (Not the testbed's fork server: a fresh-clone CI run with
    shims forked from it failed the emulator's 0 ms check, about 1 ms more per direction against 0.25 ms allowed;
    spawned shims passed every earlier run.)
    """

    def __init__(self, cloud_data_address: str, profile: LinkProfile | Sequence[LinkProfile],
                 start_timeout_s: float = START_TIMEOUT_S):
        self.cloud_data_address = cloud_data_address
        profiles = [profile] if isinstance(profile, LinkProfile) else list(profile)
        if not profiles:
            raise ValueError("a link shim needs at least one LinkProfile")
        for index, each in enumerate(profiles):
            _check_profile(each, index)
        self.profiles: list[LinkProfile] = profiles
        self.start_timeout_s = start_timeout_s
        self.ports: list[int] = []  # one per profile while running, else empty
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one request on the pipe at a time

    @property
    def profile(self) -> LinkProfile:
        return self.profiles[0]

    @property
    def port(self) -> int | None:
        return self.ports[0] if self.ports else None

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def addresses(self) -> list[str]:
        if not self.ports:
            raise RuntimeError("the link shim is not running")
        return [f"tcp://127.0.0.1:{port}" for port in self.ports]

    def add_port(self, profile: LinkProfile) -> int:
        """Another port with a profile of its own; before start. Returns its index in .ports/.addresses."""
        if self._process is not None:
            raise RuntimeError("ports are added before the link shim starts")
        _check_profile(profile, len(self.profiles))
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def is_alive(self) -> bool:
        """Whether the shim process is running."""
        return self._process is not None and self._process.is_alive()

    def start(self) -> "LinkShim":
        if self.is_alive():
            raise RuntimeError("the link shim is already started")
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(target=_serve, args=(self.cloud_data_address, list(self.profiles), child_conn),
                                  name="hat-link-shim", daemon=True)
        process.start()
        child_conn.close()  # so that the child's death reads as EOF here
        self._process, self._conn = process, parent_conn
        try:
            if not parent_conn.poll(self.start_timeout_s):
                self._halt(grace_s=0.0)
                raise RuntimeError(f"the link shim process did not start within {self.start_timeout_s:g} s")
            kind, value = parent_conn.recv()
        except (EOFError, OSError):
            self._halt()
            raise RuntimeError(f"the link shim process died while starting (exit code {process.exitcode})") from None
        if kind != "ready":
            self._halt()
            raise RuntimeError(f"the link shim process failed to start:\n{value}")
        self.ports = [int(port) for port in value]
        return self

    def stats(self) -> LinkStats:
        """Counters of the running shim."""
        with self._lock:
            if self._conn is None or not self.is_alive():
                raise RuntimeError("the link shim is not running")
            try:
                self._conn.send(("stats", None))
                if not self._conn.poll(STATS_TIMEOUT_S):
                    raise RuntimeError(f"the link shim did not answer stats() within {STATS_TIMEOUT_S:g} s")
                _, value = self._conn.recv()
            except (EOFError, OSError):
                raise RuntimeError("the link shim process has died") from None
        return LinkStats(**value)

    def stop(self) -> None:
        """Ask the process to exit; terminate it, then kill it, if it does not within STOP_TIMEOUT_S."""
        with self._lock:
            if self.is_alive() and self._conn is not None:
                try:
                    self._conn.send(("stop", None))
                except OSError:
                    pass
            self._halt()

    def _halt(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        process = self._process
        if process is not None:
            process.join(grace_s)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT_S)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.ports = []

    def __enter__(self) -> "LinkShim":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LinkModel:
    """The delay model, apart from the sockets: per device and direction, a serialising link of fixed
    rate, or of a rate that follows the profile's trace from the device's first message, followed by
    the one-way propagation delay and jitter."""

    def __init__(self, profile: LinkProfile):
        self.profile = profile
        self._rng = random.Random(profile.seed)
        self._free_at: dict[tuple[bytes, bool], float] = {}  # when each link is free again
        self._last_delivery: dict[tuple[bytes, bool], float] = {}  # when its latest message arrives
        self.origins: dict[bytes, float] = {}  # when each device's first message came: its trace time 0

    def schedule(self, device: bytes, uplink: bool, size: int, now: float) -> float:
        """When a message of `size` bytes handed to the link at `now` arrives at the far end."""
        key = (device, uplink)
        origin = self.origins.setdefault(device, now)
        starts_at = max(now, self._free_at.get(key, now))
        trace = self.profile.trace
        if trace is None:
            rate = self.profile.uplink_bytes_per_s if uplink else self.profile.downlink_bytes_per_s
            sent_at = starts_at + size / rate
        else:
            sent_at = origin + trace.transmit_end(starts_at - origin, size, uplink)
        self._free_at[key] = sent_at
        deliver_at = sent_at + self.profile.rtt_s / 2
        if self.profile.jitter_s > 0:
            deliver_at += self._rng.uniform(0.0, self.profile.jitter_s)
        deliver_at = max(deliver_at, self._last_delivery.get(key, deliver_at))  # jitter never reorders
        self._last_delivery[key] = deliver_at
        return deliver_at


def _check_profile(profile: object, index: int) -> None:
    if not isinstance(profile, LinkProfile):
        raise ValueError(f"link shim profile {index} must be a LinkProfile, not {type(profile).__name__}")


def _serve(cloud_address: str, profiles: list[LinkProfile], conn: Connection) -> None:
    """The shim process: bind a port per profile, report them, forward until told to stop or the parent goes away."""
    fronts: list[zmq.Socket] = []
    context = None
    try:
        context = zmq.Context()
        ports = []
        for _ in profiles:
            front = context.socket(zmq.ROUTER)
            fronts.append(front)
            _tune(front)
            front.bind("tcp://127.0.0.1:0")
            ports.append(int(front.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]))
        probe = context.socket(zmq.DEALER)  # a bad cloud address fails here, at start, not at the first device
        probe.setsockopt(zmq.LINGER, 0)
        probe.connect(cloud_address)
        probe.close()
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        conn.close()
        for front in fronts:
            front.close(linger=0)
        if context is not None:
            context.destroy(linger=0)
        return
    conn.send(("ready", ports))
    try:
        _Loop(context, fronts, cloud_address, profiles, conn).run()
    finally:
        for front in fronts:
            front.close(linger=0)
        context.destroy(linger=0)
        conn.close()


def _tune(socket: zmq.Socket) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)  # the shim holds messages itself; never block or drop on a watermark
    socket.setsockopt(zmq.RCVHWM, 0)


class _Loop:
    """The forwarding loop: take in from all sides, hold each message until its port's model says it arrives.
    A device is (port index, routing id): its link has the port's profile."""

    def __init__(self, context: zmq.Context, fronts: list[zmq.Socket], cloud_address: str,
                 profiles: list[LinkProfile], conn: Connection):
        self.context, self.fronts, self.cloud_address, self.conn = context, fronts, cloud_address, conn
        self.front_index = {front: index for index, front in enumerate(fronts)}
        self.models = [LinkModel(profile) for profile in profiles]  # one per port
        self.backs: dict[tuple[int, bytes], zmq.Socket] = {}  # device -> DEALER to the cloud
        self.owners: dict[zmq.Socket, tuple[int, bytes]] = {}  # and back
        # (deliver at, order, direction, device, frames)
        self.pending: list[tuple[float, int, int, tuple[int, bytes], list]] = []
        self.order = 0
        self.counts = {"up_messages": 0, "up_bytes": 0, "down_messages": 0, "down_bytes": 0}
        self.poller = zmq.Poller()
        for front in fronts:
            self.poller.register(front, zmq.POLLIN)
        self.poller.register(conn.fileno(), zmq.POLLIN)

    def run(self) -> None:
        try:
            while True:
                self._deliver_due()
                wait = self.pending[0][0] - time.perf_counter() if self.pending else None
                if wait is None or wait >= 0.002:
                    # poll's timeout is in whole milliseconds and it wakes ~0.1 ms late: wake 1-2 ms early
                    timeout_ms = _IDLE_POLL_MS if wait is None else min(_IDLE_POLL_MS, int(wait * 1000) - 1)
                    if self._receive(self.poller.poll(timeout_ms)) is None:
                        return
                    continue
                received = self._receive(self.poller.poll(0))
                if received is None:
                    return
                if not received and wait > _SPIN_S:
                    time.sleep(wait - _SPIN_S)  # sleep() wakes up to ~0.1 ms late; spin (poll(0)) the rest
        finally:
            for socket in self.backs.values():
                socket.close(linger=0)

    def _receive(self, events: list) -> bool | None:
        """Take in what the poll reported; None when the loop must end, else whether anything arrived."""
        received = False
        for socket, _ in events:
            if not isinstance(socket, zmq.Socket):
                if not self._command():
                    return None
                continue
            port = self.front_index.get(socket)
            if port is not None:
                while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frames = socket.recv_multipart(copy=False)
                    self._enqueue(_UP, (port, frames[0].bytes), frames[1:])
                    received = True
            else:
                device = self.owners[socket]
                while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._enqueue(_DOWN, device, socket.recv_multipart(copy=False))
                    received = True
        return received

    def _command(self) -> bool:
        try:
            kind, _ = self.conn.recv()
        except (EOFError, OSError):
            return False  # the parent has gone
        if kind == "stats":
            origins = {(port, device): at for port, model in enumerate(self.models)
                       for device, at in model.origins.items()}
            self.conn.send(("stats", {**self.counts, "pending": len(self.pending), "devices": len(self.backs),
                                      "origins": origins}))
            return True
        return False

    def _enqueue(self, direction: int, device: tuple[int, bytes], frames: list) -> None:
        now = time.perf_counter()
        port, routing_id = device
        if direction == _UP and device not in self.backs:
            back = self.context.socket(zmq.DEALER)
            _tune(back)
            back.setsockopt(zmq.ROUTING_ID, routing_id)  # the cloud sees the device's own identity
            back.connect(self.cloud_address)
            self.backs[device], self.owners[back] = back, device
            self.poller.register(back, zmq.POLLIN)
        deliver_at = self.models[port].schedule(routing_id, direction == _UP, sum(len(f) for f in frames), now)
        self.order += 1
        heapq.heappush(self.pending, (deliver_at, self.order, direction, device, frames))

    def _deliver_due(self) -> None:
        now = time.perf_counter()
        while self.pending and self.pending[0][0] <= now:
            _, _, direction, device, frames = heapq.heappop(self.pending)
            size = sum(len(frame) for frame in frames)
            if direction == _UP:
                self.backs[device].send_multipart(frames, copy=False)
                self.counts["up_messages"] += 1
                self.counts["up_bytes"] += size
            else:
                port, routing_id = device
                self.fronts[port].send_multipart([routing_id, *frames], copy=False)
                self.counts["down_messages"] += 1
                self.counts["down_bytes"] += size
