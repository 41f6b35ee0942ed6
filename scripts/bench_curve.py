#!/usr/bin/env python
"""What CURVE encryption costs the data plane: round trips of one message through a DEALER -> ROUTER echo on
loopback, plain against CURVE (with the ZAP handler the cloud runs), from one run.

Sizes: a decode step's hidden state (one token, 4096 wide, float16: 8 KiB), a 32-token verification
(256 KiB), and 2 MiB (a 256-token prompt chunk of a 4096-wide float16 model). Modes take turns in blocks of
--block round trips, --rounds times (machine noise hits both alike); figures are medians. The ratio is CURVE's
median over plain's, and the added milliseconds are what a device would wait more per message.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

SIZES = {"decode step (8 KiB)": 8 << 10, "verification (256 KiB)": 256 << 10, "prompt chunk (2 MiB)": 2 << 20}


class Echo:
    """A ROUTER that sends every message back, on its own thread and context (as the cloud would)."""

    def __init__(self, secure):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.security = None
        if secure is not None:
            self.security = secure.start(self.context)
            secure.protect(self.socket)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if self.socket.poll(50):
                self.socket.send_multipart(self.socket.recv_multipart(copy=False), copy=False)

    def close(self):
        self.stop.set()
        self.thread.join()
        self.socket.close(linger=0)
        if self.security is not None:
            self.security.stop()
        self.context.term()


def client(port: int, context: zmq.Context, device=None, server=None) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if device is not None:
        socket.curve_serverkey = server.curve_public
        socket.curve_publickey = device.public.curve_public
        socket.curve_secretkey = device.curve_secret
    socket.connect(f"tcp://127.0.0.1:{port}")
    return socket


def round_trip_ms(socket: zmq.Socket, payload: bytes) -> float:
    began = time.perf_counter()
    socket.send(payload, copy=False)
    if not socket.poll(10_000):
        raise RuntimeError("no echo within 10 s")
    socket.recv(copy=False)
    return (time.perf_counter() - began) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="blocks per mode and size")
    p.add_argument("--block", type=int, default=20, help="round trips per block (after one untimed)")
    args = p.parse_args(argv)
    from hat.cloud.security import CloudSecurity
    from hat.cli.keys_cmd import install_public
    from hat.common.keys import ALLOWED_DIR, PUBLIC_CURVE, generate_identity

    with tempfile.TemporaryDirectory(prefix="hat-bench-curve-") as tmp:
        generate_identity(f"{tmp}/cloud", "cloud")
        device = generate_identity(f"{tmp}/device", "device")
        install_public(device.public, Path(tmp) / "device" / ("device" + PUBLIC_CURVE),  # `hat keys add`
                       Path(tmp) / "cloud" / ALLOWED_DIR)
        security = CloudSecurity(f"{tmp}/cloud")
        echoes = {"plain": Echo(None), "curve": Echo(security)}
        context = zmq.Context()
        sockets = {"plain": client(echoes["plain"].port, context),
                   "curve": client(echoes["curve"].port, context, device, security.identity.public)}
        times = {(mode, size): [] for mode in sockets for size in SIZES}
        try:
            for _ in range(args.rounds):
                for label, size in SIZES.items():
                    payload = bytes(size)
                    for mode, socket in sockets.items():
                        round_trip_ms(socket, payload)
                        times[mode, label] += [round_trip_ms(socket, payload) for _ in range(args.block)]
        finally:
            for socket in sockets.values():
                socket.close(linger=0)
            context.term()
            for echo in echoes.values():
                echo.close()
    print(f"libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}; loopback round trips, medians of "
          f"{args.rounds * args.block}")
    print(f"{'message':<26} {'plain ms':>9} {'CURVE ms':>9} {'CURVE/plain':>12} {'added ms':>9} {'CURVE MB/s':>11}")
    for label, size in SIZES.items():
        plain, curve = statistics.median(times["plain", label]), statistics.median(times["curve", label])
        print(f"{label:<26} {plain:>9.3f} {curve:>9.3f} {curve / plain:>11.2f}x {curve - plain:>9.3f} "
              f"{2 * size / 1e6 / (curve / 1e3):>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
