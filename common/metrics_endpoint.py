"""GET /metrics for a prometheus_client registry: a route for an app that serves more, and an app (on its own thread,
with explicit timeouts) that serves nothing else. The exposition is prometheus_client's own ASGI app: Prometheus'
text format (0.0.4 unless the scraper asks for OpenMetrics or text 1.0.0), gzip when asked, `name[]` filters."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.routing import Route

from .uvicorn_thread import HttpTimeouts, UvicornThread

# a scrape is one short request: the head, keep-alive and shutdown waits of a metrics endpoint
METRICS_TIMEOUTS = HttpTimeouts(head_s=10.0, write_s=10.0, keep_alive_s=5.0, shutdown_s=1.0)


class _AsgiEndpoint:
    """Starlette calls a route's endpoint that is not a function as an ASGI app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def metrics_route(registry: CollectorRegistry) -> Route:
    """GET /metrics (exactly that path; a query string is ignored) from `registry`."""
    return Route("/metrics", _AsgiEndpoint(make_asgi_app(registry)), methods=["GET"])


class MetricsServer:
    """GET /metrics on `address` (HOST:PORT, port 0 = any free), 404 elsewhere, served by uvicorn on a thread."""

    def __init__(self, registry: CollectorRegistry, address: str, timeouts: HttpTimeouts = METRICS_TIMEOUTS):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"metrics address must be HOST:PORT, got {address!r}")
        self._server = UvicornThread(Starlette(routes=[metrics_route(registry)]), host.strip("[]"), int(port),
                                     "hat-metrics", timeouts)
        self.address = f"{host}:{self._server.address[1]}"

    def start(self) -> "MetricsServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
