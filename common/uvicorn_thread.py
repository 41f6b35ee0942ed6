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
    write_s: float = 30.0  # a response the client does not take (the send buffer stays full) this long: the
    # connection is dropped (the app's next send sees the client gone)
    keep_alive_s: float = 5.0  # a kept-alive connection idle this long is closed (uvicorn's timeout_keep_alive)
    shutdown_s: float = 5.0  # on stop, requests in flight get this long to finish before they are cancelled
    start_s: float = 30.0  # longest wait for the server to start serving


class _TimedProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the two timeouts uvicorn leaves out:
    a request head that does not arrive in time (uvicorn's keep-alive timer stops at the first byte, so a client
    that sends a byte and stalls would hold its connection for ever), and a client that stops reading (a send would
    wait for it for ever). Both cost nothing per request: timers run only while waiting."""
    timeouts: HttpTimeouts = HttpTimeouts()  # set on the subclass each server makes

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self._write_timer = None
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def pause_writing(self) -> None:  # the send buffer is full
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.timeouts.write_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._write_timer = _cancelled(self._write_timer)
        super().resume_writing()

    def connection_lost(self, exc) -> None:
        self._head_timer = _cancelled(self._head_timer)
        self._write_timer = _cancelled(self._write_timer)
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        _cancelled(self._head_timer)
        self._head_timer = self.loop.call_later(self.timeouts.head_s, self._head_timed_out, self.cycle)

    def _head_timed_out(self, cycle_when_armed) -> None:
        waiting = self.cycle is cycle_when_armed and (self.cycle is None or self.cycle.response_complete)
        if waiting and not self.transport.is_closing():  # no new request head arrived since the timer was armed
            log.info("closing a connection whose request head did not arrive within %g s", self.timeouts.head_s)
            self.transport.close()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.warning("dropping a connection whose client took no response data for %g s", self.timeouts.write_s)
        self.transport.abort()  # (close() would wait to flush the unread data)


def _cancelled(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


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
        protocol = type("TimedProtocol", (_TimedProtocol,), {"timeouts": timeouts})
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
