"""The device API's own metrics (prometheus_client, a registry per server), served at its GET /metrics: requests,
the queue, generations and how they ended, TTFT and TBT, accepted length per round, data-plane bytes, backend."""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .api_generation import Outcome

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TBT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GAIN_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
ENDPOINTS = ("/v1/models", "/health", "/v1/completions", "/v1/chat/completions", "/metrics")  # else "other"


class _LinkBytes(Collector):
    """The cloud link's own byte counts, read when scraped (cancelled and failed generations included)."""

    def __init__(self, read: Callable[[], tuple[int, int]]):
        self.read = read

    def collect(self) -> Iterable[Metric]:
        up, down = self.read()
        yield CounterMetricFamily("hat_api_bytes_up_total", "data-plane bytes sent to the cloud", value=up)
        yield CounterMetricFamily("hat_api_bytes_down_total", "data-plane bytes received from the cloud", value=down)


class ApiMetrics:
    def __init__(self, waiting: Callable[[], int], running: Callable[[], bool],
                 link_bytes: Callable[[], tuple[int, int]], backend: dict[str, str]):
        """`waiting`, `running` and `link_bytes` are read when scraped: requests queued for the device, whether a
        generation runs, the data plane's (bytes sent, bytes received)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hat_api_requests_total", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        Gauge("hat_api_queue_length", "requests waiting for the running generation", registry=r).set_function(waiting)
        Gauge("hat_api_generation_running", "1 while a generation holds the device", registry=r).set_function(
            lambda: float(running()))
        self.generations = Counter("hat_api_generations_total", "generations by how they ended (stop, length; "
                                   "cancelled: the client went away; error)", ["finish_reason"], registry=r)
        self.ttft = Histogram("hat_api_ttft_seconds", "time to first token, from the start of the generation",
                              buckets=SECONDS_BUCKETS, registry=r)
        self.tbt = Histogram("hat_api_tbt_seconds", "time between consecutive tokens", buckets=TBT_BUCKETS_S,
                             registry=r)
        self.gains = Histogram("hat_api_accept_length", "tokens gained per decode round (accepted drafts + 1; 1 "
                               "without speculation)", buckets=GAIN_BUCKETS, registry=r)
        r.register(_LinkBytes(link_bytes))
        Info("hat_api_backend", "what serves the model: backend, model id, speculative decoding",
             registry=r).info(backend)

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def generation(self, outcome: Outcome) -> None:
        self.generations.labels(outcome.finish_reason).inc()
        self.ttft.observe(outcome.hat["ttft_ms"] / 1000)
        for gap in outcome.tbt_s:
            self.tbt.observe(gap)
        for gain in outcome.round_gains:
            self.gains.observe(gain)

    def ended_early(self, reason: str) -> None:
        """A generation that produced no outcome: "cancelled" or "error"."""
        self.generations.labels(reason).inc()
