"""The cloud's metrics (a cloud server, a router, a worker) through prometheus_client, served at GET /metrics
(`--metrics HOST:PORT`, hat.common.metrics_endpoint).

Counters and histograms the data plane records are prometheus_client's Counter and Histogram; values the server
keeps anyway (sessions, KV blocks, ...) are read when scraped, by a collector. Each CloudMetrics has its own
CollectorRegistry, not the process-wide default one: a router and workers in one process (the tests, the testbed)
keep their metrics apart, and nothing another library registers leaks into ours.

Processes that fork: every serving process (cloud server, router, each worker) is its own scrape target with its
own registry; a pipeline's stage processes are spawned, not forked, and record nothing (the serving process
records their forwards). So prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR) is not used, and must
not be set for these processes: it would move the values into files shared by every registry of the process.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("hat.cloud")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

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


def warn_if_multiprocess_mode() -> None:
    """prometheus_client picks its multiprocess values at import when PROMETHEUS_MULTIPROC_DIR is set (see above)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("PROMETHEUS_MULTIPROC_DIR is set: hat's metrics are per process and do not use prometheus_client's "
                    "multiprocess mode; unset it, or two registries in one process may mix their values")


class _ReadWhenScraped(Collector):
    """The gauges and counters a CloudMetrics reads from the server at each scrape, and its labelled families."""

    def __init__(self, metrics: "CloudMetrics"):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        for name, (help_text, read) in list(self.metrics.gauges.items()):
            yield GaugeMetricFamily(name, help_text, value=read())
        for name, (help_text, read) in list(self.metrics.counters.items()):
            yield CounterMetricFamily(name, help_text, value=read())
        for family in list(self.metrics.families):
            yield from family()


class CloudMetrics:
    def __init__(self):
        warn_if_multiprocess_mode()
        self.registry = CollectorRegistry()
        r = self.registry
        self.histograms = {name: Histogram(name, help_text, buckets=buckets, registry=r)
                           for name, (help_text, buckets) in HISTOGRAMS.items()}
        self.tokens = Counter("hat_tokens_total", "middle-part tokens by kind of FORWARD", ["kind"], registry=r)
        self.errors = Counter("hat_errors_total", "ERROR replies by code", ["code"], registry=r)
        self.slo_misses = Counter("hat_slo_misses_total", "cloud-side prefills (ttft) and round intervals (tbt) over "
                                  "their session's target", ["kind"], registry=r)
        for counter, kinds in ((self.tokens, ("prefill", "decode")), (self.slo_misses, ("ttft", "tbt"))):
            for kind in kinds:  # shown at 0 from the start
                counter.labels(kind)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}  # name: (help, read when scraped)
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}  # name: (help, read when scraped)
        self.families: list[Callable[[], Iterable[Metric]]] = []  # labelled families, made when scraped
        r.register(_ReadWhenScraped(self))

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def add_tokens(self, kind: str, count: int) -> None:
        self.tokens.labels(kind).inc(count)

    def add_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def add_slo_miss(self, kind: str) -> None:
        self.slo_misses.labels(kind).inc()

    def render(self) -> str:
        """The exposition in Prometheus' text format (what GET /metrics serves a plain scraper)."""
        return generate_latest(self.registry).decode()
