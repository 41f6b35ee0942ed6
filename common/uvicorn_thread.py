"""An ASGI app served by uvicorn on a thread of its own, every timeout explicit: the HTTP server of `hat device
serve` and of every `/metrics` endpoint.

uvicorn runs in the calling process (one worker, never forked), so the process's signal handling stays its
owner's: `stop()` ends the server from any thread (listeners closed at once, idle keep-alive connections closed,
requests in flight given `shutdown_s` to finish, then cancelled).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpTimeouts:
    head_s: float = 30.0  # a request's line and headers must arrive within this of the connection's opening (or of
    # the previous response's end on a kept-alive connection); else the connection is closed
    keep_alive_s: float = 5.0  # a kept-alive connection idle this long is closed (uvicorn's timeout_keep_alive)
    shutdown_s: float = 5.0  # on stop, requests in flight get this long to finish before they are cancelled
    start_s: float = 30.0  # longest wait for the server to start serving


class _HeadTimeoutProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the one read timeout uvicorn leaves out:
    a request head that does not arrive in time. (uvicorn's keep-alive timer stops at the first byte, so a client
    that sends a byte and stalls would hold its connection for ever.)"""
    head_timeout_s: float = HttpTimeouts.head_s  # set on the subclass each server makes

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out, self.cycle)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, cycle_when_armed) -> None:
        waiting = self.cycle is cycle_when_armed and (self.cycle is None or self.cycle.response_complete)
        if waiting and not self.transport.is_closing():  # no new request head arrived since the timer was armed
            log.info("closing a connection whose request head did not arrive within %g s", self.head_timeout_s)
            self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT (port 0: any free one); an address in use raises here, in the caller.
    Made with protocol IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections of
    such a socket, and with it on, a kept-alive request waits for the client's delayed ACK (about 40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class UvicornThread:
    """`app` served on `host`:`port` by uvicorn on a thread named `name`; `start()` returns once it serves."""

    def __init__(self, app, host: str, port: int, name: str, timeouts: HttpTimeouts = HttpTimeouts(),
                 access_log: bool = False):
        self.socket = bind(host, port)
        self.address: tuple[str, int] = self.socket.getsockname()[:2]
        protocol = type("HeadTimeoutProtocol", (_HeadTimeoutProtocol,), {"head_timeout_s": timeouts.head_s})
        config = uvicorn.Config(app, http=protocol, ws="none", lifespan="off", log_config=None,
                                access_log=access_log, timeout_keep_alive=timeouts.keep_alive_s,
                                timeout_graceful_shutdown=timeouts.shutdown_s)
        self.server = uvicorn.Server(config)
        self.timeouts, self.name = timeouts, name
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once started
        self._thread: threading.Thread | None = None

    def start(self) -> "UvicornThread":
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.timeouts.start_s
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self.server.started:
            self.stop()
            raise RuntimeError(f"{self.name}: the HTTP server did not start")
        return self

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.socket])

        asyncio.run(serve())

    def stop(self) -> None:
        """Stop serving (see the module's doc); returns once the server's thread has ended."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.timeouts.shutdown_s + 5)
            if self._thread.is_alive():
                log.warning("%s: the HTTP server did not stop in time", self.name)
        self.socket.close()
