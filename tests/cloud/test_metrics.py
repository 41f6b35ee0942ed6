"""The cloud's Prometheus metrics, scraped over HTTP from a running cloud and from `hat cloud serve --metrics`.

The exposition is valid text format (HELP and TYPE before each family's samples, every sample line
`name{labels} value` or `name value`; prometheus_client's own parser reads the same samples), histograms are
cumulative with _count equal to the +Inf bucket,
and the numbers follow what the cloud did: sessions held, KV blocks, tokens by kind, batches, errors,
the cloud's view of time to first token.
"""
from __future__ import annotations

import math
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster import running_cloud, running_disaggregated
from hat.cloud.metrics import COUNT_BUCKETS, CloudMetrics
from hat.common.bundle import load_manifest
from hat.common.proto import hat_pb2 as pb
from hat.common.split import split_checkpoint
from hat.device.cloud_link import CloudError, CloudLink

_DEVICE_TESTS = str(Path(__file__).resolve().parents[1] / "device")
if _DEVICE_TESTS not in sys.path:
    sys.path.insert(0, _DEVICE_TESTS)

import test_cli  # noqa: E402  (tests/device/test_cli.py: how the CLI cloud is started)

K, M = test_cli.K, test_cli.M  # the split test_cli's CloudProcess checks in its ready line
PROMPT = "The quick brown fox jumps over the lazy dog."
NEW_TOKENS = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------------------- parsing

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)?\}})? (\S+)$")
_HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass
class Family:
    name: str
    help: str = ""
    type: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, **labels) -> float:
        """The one sample of this family with exactly these labels (for counters and gauges)."""
        found = [v for n, ls, v in self.samples if n == self.name and ls == labels]
        assert len(found) == 1, (self.name, labels, self.samples)
        return found[0]


def _family_of(sample: str, families: dict[str, Family]) -> str:
    if sample in families:
        return sample
    for suffix in _HISTOGRAM_SUFFIXES:
        base = sample.removesuffix(suffix)
        if base != sample and base in families and families[base].type == "histogram":
            return base
    raise AssertionError(f"sample {sample!r} has no HELP/TYPE before it")


def parse(text: str) -> dict[str, Family]:
    """Parse (and check) Prometheus text format: HELP then TYPE once per family before its samples, every sample
    line `name{labels} value` or `name value`, values floats, no sample repeated."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    seen: set[tuple] = set()
    for line in text.rstrip("\n").split("\n"):
        assert line.strip(), "no blank lines expected"
        if line.startswith("# HELP "):
            match = _HELP.match(line)
            assert match, line
            name = match.group(1)
            assert name not in families, f"family {name} declared twice"
            families[name] = Family(name, help=match.group(2))
            continue
        if line.startswith("# TYPE "):
            match = _TYPE.match(line)
            assert match, line
            family = families.get(match.group(1))
            assert family is not None and not family.type and not family.samples, f"TYPE out of place: {line}"
            family.type = match.group(2)
            continue
        assert not line.startswith("#"), line
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, raw_labels, raw_value = match.groups()
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"', raw_labels or ""))
        value = float(raw_value)  # also +Inf, NaN
        family = families[_family_of(name, families)]
        assert family.type, f"sample {name} before its TYPE"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"sample repeated: {line}"
        seen.add(key)
        family.samples.append((name, labels, value))
    return families


@dataclass
class Histogram:
    buckets: list[tuple[float, float]]  # (le, cumulative count)
    sum: float
    count: float


def histogram(families: dict[str, Family], name: str) -> Histogram:
    """The histogram `name`, checked: buckets in increasing `le` ending at +Inf, counts cumulative (never
    decreasing), _count equal to the +Inf bucket, _sum present."""
    family = families[name]
    assert family.type == "histogram"
    buckets = [(float(ls["le"]), v) for n, ls, v in family.samples if n == f"{name}_bucket"]
    assert buckets and buckets[-1][0] == math.inf, buckets
    les = [le for le, _ in buckets]
    assert les == sorted(les) and len(set(les)) == len(les), les
    counts = [c for _, c in buckets]
    assert all(a <= b for a, b in zip(counts, counts[1:])), counts
    sums = [v for n, _, v in family.samples if n == f"{name}_sum"]
    totals = [v for n, _, v in family.samples if n == f"{name}_count"]
    assert len(sums) == len(totals) == 1
    assert totals[0] == counts[-1], (name, totals, counts)
    assert sums[0] >= 0
    return Histogram(buckets, sums[0], totals[0])


def library_parse(text: str) -> dict[tuple, float]:
    """The exposition through prometheus_client's own parser: {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, key
            samples[key] = sample.value
    return samples


def scrape(address: str, path: str = "/metrics") -> dict[str, Family]:
    """GET /metrics, checked by the parser above and by prometheus_client's, which must read the same samples."""
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    families = parse(text)
    for name, family in families.items():
        if family.type == "histogram":
            histogram(families, name)
    ours = {(n, tuple(sorted(ls.items()))): v for f in families.values() for n, ls, v in f.samples}
    assert library_parse(text) == ours
    return families


# --------------------------------------------------------------------------------------- a running cloud


@pytest.fixture(scope="module")
def cloud(tiny_checkpoint, tmp_path_factory, one_torch_thread):
    with running_cloud(tiny_checkpoint("llama3"), K, M, tmp_path_factory.mktemp("metrics"),
                       metrics_address="127.0.0.1:0") as cluster:
        yield cluster


def test_metrics_address_is_bound_and_the_exposition_is_valid(cloud):
    """CloudServer.metrics_address is the bound HOST:PORT; /metrics is valid text format with the documented
    families and types."""
    host, port = cloud.server.metrics_address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    families = scrape(cloud.server.metrics_address)
    types = {name: f.type for name, f in families.items()}
    for name in ("hat_sessions", "hat_pending_forwards", "hat_kv_blocks_used", "hat_kv_blocks_total",
                 "hat_kv_block_bytes", "hat_draining"):
        assert types[name] == "gauge", name
    for name in ("hat_forward_batches_total", "hat_admission_refusals_total", "hat_expired_sessions_total",
                 "hat_tokens_total", "hat_errors_total"):
        assert types[name] == "counter", name
    for name in ("hat_batch_sessions", "hat_batch_tokens", "hat_forward_seconds", "hat_queue_seconds",
                 "hat_prefill_seconds", "hat_round_interval_seconds"):
        assert types[name] == "histogram", name
    assert all(f.help for f in families.values())
    budget = cloud.server.budget
    assert families["hat_kv_blocks_total"].value() == budget.total_blocks
    assert families["hat_kv_block_bytes"].value() == budget.block_bytes
    assert families["hat_draining"].value() == 0


def test_a_generation_moves_the_counters_and_histograms(cloud):
    """One plain generation of >= 2 tokens: prefill tokens grow by the prompt length, decode tokens by one per
    round, hat_prefill_seconds counts 1 more, batches match the server's stats, sessions are back to 0."""
    before = scrape(cloud.server.metrics_address)
    with cloud.generator() as gen:
        result = gen.generate(PROMPT, NEW_TOKENS)
    assert len(result.token_ids) >= 2 and result.recoveries == 0
    after = scrape(cloud.server.metrics_address)

    def delta(name, **labels):
        return after[name].value(**labels) - before[name].value(**labels)

    assert delta("hat_tokens_total", kind="prefill") == result.prompt_tokens
    assert delta("hat_tokens_total", kind="decode") == len(result.token_ids) - 1
    assert delta("hat_forward_batches_total") >= 1 + len(result.token_ids) - 1
    assert after["hat_forward_batches_total"].value() == cloud.server.stats.forward_batches
    hist = {name: (histogram(before, name), histogram(after, name)) for name in
            ("hat_prefill_seconds", "hat_round_interval_seconds", "hat_batch_sessions", "hat_batch_tokens",
             "hat_forward_seconds", "hat_queue_seconds")}
    assert hist["hat_prefill_seconds"][1].count - hist["hat_prefill_seconds"][0].count == 1
    assert hist["hat_round_interval_seconds"][1].count - hist["hat_round_interval_seconds"][0].count \
        == len(result.token_ids) - 2
    batches = delta("hat_forward_batches_total")
    for name in ("hat_batch_sessions", "hat_batch_tokens", "hat_forward_seconds"):
        assert hist[name][1].count - hist[name][0].count == batches, name
    tokens = result.prompt_tokens + len(result.token_ids) - 1
    assert hist["hat_batch_tokens"][1].sum - hist["hat_batch_tokens"][0].sum == pytest.approx(tokens)
    assert hist["hat_queue_seconds"][1].count - hist["hat_queue_seconds"][0].count == batches  # one session: a job a batch
    ttft = hist["hat_prefill_seconds"][1].sum - hist["hat_prefill_seconds"][0].sum
    assert 0 < ttft < result.ttft_ms / 1000 + 1
    assert after["hat_sessions"].value() == 0 and after["hat_kv_blocks_used"].value() == 0
    assert after["hat_pending_forwards"].value() == 0


def test_sessions_and_kv_blocks_gauges_follow_open_and_close(cloud):
    """hat_sessions and hat_kv_blocks_used show a held session and its reserved blocks, and drop at CLOSE."""
    address = cloud.server.metrics_address
    with CloudLink(cloud.link_config(device_id="metrics-gauges")) as link:
        link.register(load_manifest(cloud.device_dir, part="device"))
        link.open_session("g1", 40)
        link.open_session("g2", 16)
        families = scrape(address)
        assert families["hat_sessions"].value() == 2
        assert families["hat_kv_blocks_used"].value() == cloud.server.budget.blocks_for(40) + 1
        link.close_session("g1")
        link.close_session("g2")
    families = scrape(address)
    assert families["hat_sessions"].value() == 0 and families["hat_kv_blocks_used"].value() == 0


def test_errors_are_counted_by_code(cloud):
    """An ERROR reply increments hat_errors_total with its code as the label."""
    address = cloud.server.metrics_address
    before = scrape(address)["hat_errors_total"]
    previous = {ls["code"]: v for _, ls, v in before.samples}
    with CloudLink(cloud.link_config(device_id="metrics-errors")) as link:
        link.register(load_manifest(cloud.device_dir, part="device"))
        with pytest.raises(CloudError):
            link.forward("never-opened", 0, torch.randn(2, cloud.server.worker.part.spec.hidden_size))
        with pytest.raises(CloudError):
            link.forward("never-opened", 0, torch.randn(2, cloud.server.worker.part.spec.hidden_size))
    family = scrape(address)["hat_errors_total"]
    assert family.value(code="UNKNOWN_SESSION") == previous.get("UNKNOWN_SESSION", 0) + 2
    assert all(ls.keys() == {"code"} and ls["code"] in pb.ErrorCode.keys() for _, ls, _ in family.samples)


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/extra", "/favicon.ico"])
def test_other_paths_are_404(cloud, path):
    """Only /metrics is served; every other path gets 404."""
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{cloud.server.metrics_address}{path}", timeout=10)
    assert info.value.code == 404


def test_query_string_is_ignored(cloud):
    """/metrics?anything is still the metrics page."""
    assert "hat_sessions" in scrape(cloud.server.metrics_address, "/metrics?format=text")


def test_no_metrics_address_means_no_endpoint(tmp_path, tiny_checkpoint):
    """Without metrics_address the server starts no HTTP endpoint (metrics_address stays empty)."""
    with running_cloud(tiny_checkpoint("llama3"), K, M, tmp_path, profile_on_start=False) as cluster:
        assert cluster.server.metrics_address == ""


def test_histogram_buckets_are_upper_inclusive():
    """A value equal to a bucket's bound counts in that bucket (le); one above the last bound only in +Inf; buckets
    stay cumulative and _sum adds the values."""
    metrics = CloudMetrics()
    for value in (1, 2, 3, COUNT_BUCKETS[-1], COUNT_BUCKETS[-1] + 1):
        metrics.observe("hat_batch_tokens", value)
    h = histogram(parse(metrics.render()), "hat_batch_tokens")
    counts = dict(h.buckets)
    assert (counts[1], counts[2], counts[4], counts[COUNT_BUCKETS[-2]]) == (1, 2, 3, 3)
    assert counts[COUNT_BUCKETS[-1]] == 4 and counts[math.inf] == h.count == 5
    assert h.sum == 1 + 2 + 3 + 2 * COUNT_BUCKETS[-1] + 1


def test_large_counter_values_are_exact():
    """A counter or gauge above a million is rendered exactly (Prometheus counters must not lose increments)."""
    metrics = CloudMetrics()
    metrics.counters["hat_forward_batches_total"] = ("forwards", lambda: 1234567)
    metrics.gauges["hat_kv_blocks_total"] = ("blocks", lambda: 87654321)
    families = parse(metrics.render())
    assert families["hat_forward_batches_total"].value() == 1234567
    assert families["hat_kv_blocks_total"].value() == 87654321


def test_router_and_worker_endpoints_parse_and_count_one_generation(tiny_checkpoint, tmp_path):
    """A router with a prefill and a decode worker, each with its own /metrics (policy "always"): every endpoint
    parses (both parsers), the router counts its workers and the one handoff, and the workers' middle-part tokens
    add up to the generation's (prompt on the prefill worker, rounds on the decode worker)."""
    with running_disaggregated(tiny_checkpoint("llama3"), K, M, tmp_path, prefill=1, decode=1, profile_on_start=False,
                               metrics_address="127.0.0.1:0", router_overrides={"disaggregation": "always",
                                                                                "metrics_address": "127.0.0.1:0"}
                               ) as cluster:
        with cluster.generator() as gen:
            result = gen.generate(PROMPT, NEW_TOKENS)
        router = scrape(cluster.server.metrics_address)
        prefill, decode = (scrape(worker.metrics_address) for worker in cluster.workers)
    assert result.recoveries == 0 and len(result.token_ids) >= 2
    assert router["hat_router_workers"].value() == 2 and router["hat_handoffs_total"].value() == 1
    assert histogram(router, "hat_handoff_seconds").count == 1
    assert prefill["hat_tokens_total"].value(kind="prefill") == result.prompt_tokens
    assert decode["hat_tokens_total"].value(kind="decode") == len(result.token_ids) - 1
    assert prefill["hat_tokens_total"].value(kind="decode") == decode["hat_tokens_total"].value(kind="prefill") == 0


# --------------------------------------------------------------------------------------- the CLI


def test_cli_cloud_prints_the_metrics_url_in_its_ready_line(tiny_checkpoint, tmp_path, monkeypatch):
    """`hat cloud serve --metrics 127.0.0.1:0` prints metrics=http://127.0.0.1:PORT/metrics in its ready line,
    that URL serves valid metrics, and SIGTERM stops the process cleanly."""
    split_checkpoint(tiny_checkpoint(test_cli.FAMILY), K, M, tmp_path / "B")
    plain_start = test_cli.start
    monkeypatch.setattr(test_cli, "start", lambda *args, **kw: plain_start(*args, "--metrics", "127.0.0.1:0", **kw))
    server = test_cli.CloudProcess(tmp_path / "B")
    try:
        server.wait_ready()
        ready = [line for line in server.lines if line.startswith("ready ")]
        assert len(ready) == 1
        match = re.search(r" metrics=http://(127\.0\.0\.1:(\d+))/metrics$", ready[0].rstrip("\n"))
        assert match and int(match.group(2)) > 0, ready[0]
        families = scrape(match.group(1))
        assert families["hat_sessions"].value() == 0 and families["hat_draining"].value() == 0
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{match.group(1)}/", timeout=10)
        assert info.value.code == 404
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        assert "stopped" in server.output().splitlines()[-1]
    finally:
        server.stop()


def test_prefill_seconds_count_from_the_open_arrival(cloud, monkeypatch):
    """An OPEN that arrives while a slow forward runs: hat_prefill_seconds includes the time it waited for the engine
    (the cloud's view of TTFT from the OPEN's arrival)."""
    worker = cloud.server.worker
    plain_run = worker.run
    slow_s = 0.8

    def run(jobs):
        if any(job.header.session_id == "slow" for job in jobs):
            time.sleep(slow_s)
        return plain_run(jobs)

    monkeypatch.setattr(worker, "run", run)
    address = cloud.server.metrics_address
    hidden_size = worker.part.spec.hidden_size
    before = histogram(scrape(address), "hat_prefill_seconds")
    with CloudLink(cloud.link_config(device_id="metrics-slow")) as slow, \
            CloudLink(cloud.link_config(device_id="metrics-ttft")) as link:
        for each in (slow, link):
            each.register(load_manifest(cloud.device_dir, part="device"))
        slow.open_session("slow", 16)
        busy = slow.send_forward("slow", 0, torch.randn(2, hidden_size))
        time.sleep(0.2)  # the slow forward is running
        began = time.monotonic()
        opened = link.send_open("ttft", 16)
        chunk = link.send_forward("ttft", 0, torch.randn(4, hidden_size), append_only=True)
        link.receive(opened)
        link.receive(chunk)
        waited = time.monotonic() - began
        link.forward("ttft", 4, torch.randn(1, hidden_size))  # the first round: the prompt was complete
        slow.receive(busy)
        link.close_session("ttft")
        slow.close_session("slow")
    after = histogram(scrape(address), "hat_prefill_seconds")
    assert after.count == before.count + 1
    assert waited >= slow_s - 0.3
    assert after.sum - before.sum >= waited - 0.2, (after.sum - before.sum, waited)
