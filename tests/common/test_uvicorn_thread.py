"""The threaded uvicorn server every HTTP endpoint runs on: kept-alive requests are not held back by Nagle's
algorithm, stop() ends it with an idle connection open and frees the port, a port in use fails in the caller."""
from __future__ import annotations

import asyncio
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



def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout():
    """An app streaming to a client that reads nothing: once the send buffers are full its send waits; write_s
    (0.5 s) later the connection is dropped and the app hears the client is gone (receive() says disconnect)."""
    seen = {}

    async def flood(scope, receive, send):
        if scope["type"] != "http":
            return

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            seen["gone"] = time.monotonic()

        watcher = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for sent in range(1, 1000):  # up to ~1 GB: far more than any socket buffers hold
            if watcher.done():
                break
            await send({"type": "http.response.body", "body": b"x" * (1 << 20), "more_body": True})
            seen["sent_mb"], seen["last_send"] = sent, time.monotonic()
        watcher.cancel()

    running = UvicornThread(flood, "127.0.0.1", 0, "test-http", HttpTimeouts(write_s=0.5, shutdown_s=1.0)).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(running.address)
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        client.recv(1024)  # the response began; nothing more is read
        deadline = time.monotonic() + 20
        while "gone" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        gone_while_connected = dict(seen)
    finally:
        client.close()
        running.stop()
    seen = gone_while_connected
    assert "gone" in seen and seen["sent_mb"] < 999, seen
    assert seen["gone"] - seen["last_send"] < 5, seen  # dropped about write_s after the sends stopped going out
