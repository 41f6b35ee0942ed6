"""The threaded uvicorn server every HTTP endpoint runs on: kept-alive requests are not held back by Nagle's
algorithm, stop() ends it with an idle connection open and frees the port, a port in use fails in the caller."""
from __future__ import annotations

import http.client
import socket
import statistics
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from hat.common.uvicorn_thread import HttpTimeouts, UvicornThread


async def hello(request):
    return PlainTextResponse("hello")


def server(**timeouts) -> UvicornThread:
    return UvicornThread(Starlette(routes=[Route("/", hello)]), "127.0.0.1", 0, "test-http", HttpTimeouts(**timeouts))


def get(conn: http.client.HTTPConnection) -> float:
    began = time.perf_counter()
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"hello"
    return time.perf_counter() - began


def test_a_kept_alive_request_is_faster_than_a_new_connection():
    """With Nagle's algorithm on (a listening socket of protocol 0), a kept-alive request's response waits for the
    client's delayed ACK, ~40 ms, 10 times a fresh connection's whole request; without it, it is the faster."""
    with_server = server().start()
    try:
        fresh = []
        for _ in range(30):
            conn = http.client.HTTPConnection(*with_server.address, timeout=10)
            fresh.append(get(conn))
            conn.close()
        conn = http.client.HTTPConnection(*with_server.address, timeout=10)
        get(conn)
        sock = conn.sock
        kept = [get(conn) for _ in range(30)]
        assert conn.sock is sock
        conn.close()
    finally:
        with_server.stop()
    assert statistics.median(kept) < statistics.median(fresh), (statistics.median(kept), statistics.median(fresh))


def test_stop_with_an_idle_connection_open_frees_the_port():
    """stop() returns promptly although a kept-alive connection is open (it is closed), and the port is free."""
    running = server(keep_alive_s=60.0, shutdown_s=1.0).start()
    conn = http.client.HTTPConnection(*running.address, timeout=10)
    get(conn)
    began = time.monotonic()
    running.stop()
    assert time.monotonic() - began < 10
    assert conn.sock.recv(1) == b""  # closed by the server
    conn.close()
    with socket.create_server(running.address):  # the port can be bound again
        pass


def test_an_address_in_use_fails_in_the_caller():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(OSError):
            UvicornThread(Starlette(), "127.0.0.1", taken.getsockname()[1], "test-http")
