"""The cloud's metrics in Prometheus' text exposition format, served over HTTP (`--metrics HOST:PORT`).

Counters and histograms are recorded by the data plane; gauges are read when scraped. Written here
rather than with prometheus_client: the format is a few lines of text, and the cloud keeps no
dependency it does not need.
"""
from __future__ import annotations

import bisect
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {running}"]


HISTOGRAMS = {  # name: (help, buckets)
    "hat_batch_sessions": ("sessions in one forward of the middle part", COUNT_BUCKETS),
    "hat_batch_tokens": ("tokens in one forward of the middle part", COUNT_BUCKETS),
    "hat_forward_seconds": ("time of one forward of the middle part", LATENCY_BUCKETS_S),
    "hat_queue_seconds": ("a FORWARD's wait between its arrival and its forward", LATENCY_BUCKETS_S),
    "hat_prefill_seconds": ("a session's OPEN arrival to its last prompt chunk's reply (the cloud's view of TTFT)",
                            LATENCY_BUCKETS_S),
    "hat_round_interval_seconds": ("between a session's consecutive decode or verification replies (the cloud's "
                                   "view of time between rounds)", LATENCY_BUCKETS_S),
    "hat_handoff_seconds": ("a session's KV handoff, from the router's order to the target worker's ADOPTED",
                            LATENCY_BUCKETS_S),
}


class CloudMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.histograms = {name: Histogram(buckets) for name, (_, buckets) in HISTOGRAMS.items()}
        self.tokens = {"prefill": 0, "decode": 0}  # middle-part tokens by kind of FORWARD
        self.errors: dict[str, int] = {}  # ERROR replies by code
        self.slo_misses = {"ttft": 0, "tbt": 0}  # cloud-side prefills and round intervals over their session's target
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}  # name: (help, read when scraped)
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}  # name: (help, read when scraped)
        self.families: list[Callable[[], list[str]]] = []  # labelled families, their lines read when scraped

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)

    def add_tokens(self, kind: str, count: int) -> None:
        with self._lock:
            self.tokens[kind] += count

    def add_error(self, code: str) -> None:
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def add_slo_miss(self, kind: str) -> None:
        with self._lock:
            self.slo_misses[kind] += 1

    def render(self) -> str:
        lines = []
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(read())}"]
        for name, (help_text, read) in self.counters.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {_number(read())}"]
        for family in self.families:
            lines += family()
        with self._lock:
            lines += ["# HELP hat_tokens_total middle-part tokens by kind of FORWARD", "# TYPE hat_tokens_total counter"]
            lines += [f'hat_tokens_total{{kind="{kind}"}} {count}' for kind, count in self.tokens.items()]
            lines += ["# HELP hat_errors_total ERROR replies by code", "# TYPE hat_errors_total counter"]
            lines += [f'hat_errors_total{{code="{code}"}} {count}' for code, count in sorted(self.errors.items())]
            lines += ["# HELP hat_slo_misses_total cloud-side prefills (ttft) and round intervals (tbt) over their "
                      "session's target", "# TYPE hat_slo_misses_total counter"]
            lines += [f'hat_slo_misses_total{{kind="{kind}"}} {count}' for kind, count in self.slo_misses.items()]
            for name, histogram in self.histograms.items():
                lines += [f"# HELP {name} {HISTOGRAMS[name][0]}", f"# TYPE {name} histogram", *histogram.lines(name)]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Exact for whole numbers (a counter past 10**6 must not lose digits), full precision otherwise."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class MetricsServer:
    """GET /metrics on `address` (HOST:PORT, port 0 = any free), on a thread of its own."""

    def __init__(self, metrics: CloudMetrics, address: str):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"metrics address must be HOST:PORT, got {address!r}")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not worth a log line each
                pass

        self._server = ThreadingHTTPServer((host, int(port)), Handler)
        self._server.daemon_threads = True
        self.address = f"{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hat-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
