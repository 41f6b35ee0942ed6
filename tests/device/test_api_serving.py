"""How `hat device serve`'s API serves: clients queued for the one generation the device runs, a client that goes
away (mid-stream, or while it waits) freeing the device at once, keep-alive, the read timeouts, the device's own
/metrics read with prometheus_client's parser, and shutdown (stop(), SIGINT mid-stream).

transformers is the oracle of every completion (temperature 0), as in test_openai_api.py, whose module fixture
(a tiny llama split 2/1, an in-process cloud, one API server) these tests share; tests that need other settings
start a second server on the same generator.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from openai import APIError, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from test_openai_api import MODEL, NEW_TOKENS, PROMPT, device_held, request, serve_process, served  # noqa: F401

from hat.device.generator import GenerationCancelled
from hat.device.openai_api import OpenAIServer, ServeConfig

PROMPTS = [PROMPT, "class Stack:", "import numpy as np", "for i in range(10):"]
ROUND_S = 0.05  # the pace of a slowed generation: each text delta waits this long
LONG = 200  # tokens of a generation that only a disconnect ends early (prompt + LONG < the tiny model's 256)


@contextmanager
def second_server(served, **config):
    """Another API server on the module's generator (the module's own one stays idle meanwhile)."""
    settings = {"port": 0, "queue_timeout_s": 60.0, "read_timeout_s": 10.0, "model_name": MODEL, **config}
    with OpenAIServer(served.server.generator, "unused", ServeConfig(**settings)) as server:
        yield server


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def raw_post(server: OpenAIServer, body: dict) -> socket.socket:
    """A POST /v1/completions sent on a socket of its own (read it, or close it to go away)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(server.address, timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def scrape(server: OpenAIServer) -> dict:
    """GET /metrics through prometheus_client's own parser: {family name: family}."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    conn.close()
    return families


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    found = [s.value for s in families[name].samples if s.name == (sample or name) and s.labels == labels]
    return found[0] if found else 0.0


def test_four_concurrent_clients_get_correct_completions_in_turn(served, monkeypatch):
    """4 clients at once: each gets transformers' greedy completion of its own prompt, the generations run one at a
    time (no overlap) in arrival order, and while the first runs the other three wait in the queue."""
    expected = [served.text(served.greedy(served.tokenizer(p)["input_ids"])) for p in PROMPTS]
    gen = served.server.generator
    plain, spans, waiting = gen.generate_ids, [], []
    with second_server(served, max_queue=len(PROMPTS)) as server:
        def recorded(ids, *args, **kwargs):
            if not spans:  # the first generation holds the device until the three others wait
                assert wait_until(lambda: server.gate.waiting == len(PROMPTS) - 1, 60)
            waiting.append(server.gate.waiting)
            began = time.perf_counter()
            try:
                return plain(ids, *args, **kwargs)
            finally:
                spans.append((began, time.perf_counter()))

        monkeypatch.setattr(gen, "generate_ids", recorded)
        client = OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            replies = list(pool.map(lambda p: client.completions.create(
                model=MODEL, prompt=p, max_tokens=NEW_TOKENS, temperature=0), PROMPTS))
        families = scrape(server)
    assert [r.choices[0].text for r in replies] == expected
    assert waiting == [3, 2, 1, 0]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert value(families, "hat_api_requests", "hat_api_requests_total", endpoint="/v1/completions",
                 status="200") == len(PROMPTS)
    assert value(families, "hat_api_queue_length") == 0


def paced(gen, monkeypatch) -> dict:
    """Slow `gen` to ROUND_S a text delta, with no end-of-sequence token; returns what its generations did:
    `deltas` (perf_counter of each), `ended` (when generate_ids returned or raised), `error` (what it raised)."""
    monkeypatch.setattr(gen.model, "stop_ids", ())
    plain, seen = gen.generate_ids, {"deltas": []}

    def slowed(ids, max_new_tokens, sampling, on_text, started, cancel):
        def on_slow_text(text):
            seen["deltas"].append(time.perf_counter())
            time.sleep(ROUND_S)
            on_text(text)

        try:
            return plain(ids, max_new_tokens, sampling, on_slow_text, started, cancel)
        except BaseException as exc:
            seen["error"] = exc
            raise
        finally:
            seen["ended"] = time.perf_counter()

    monkeypatch.setattr(gen, "generate_ids", slowed)
    return seen


def test_a_client_gone_mid_stream_frees_the_device_at_once(served, monkeypatch):
    """A streaming client that closes its connection after 3 events: its generation (LONG tokens at ROUND_S each,
    over 10 s in full) ends within a few rounds, cancelled, the device is free and the next request is served."""
    server = served.server
    before = scrape(server)
    seen = paced(server.generator, monkeypatch)
    sock = raw_post(server, {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True})
    received = b""
    while received.count(b"data: ") < 3:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    gone = time.perf_counter()
    assert wait_until(lambda: "ended" in seen, 10)
    assert isinstance(seen.get("error"), GenerationCancelled)
    after_gone = [t for t in seen["deltas"] if t > gone]
    assert len(after_gone) <= 5 and seen["ended"] - gone < 2.0, (len(after_gone), seen["ended"] - gone)
    assert len(seen["deltas"]) < LONG // 4  # it did not run on
    assert wait_until(lambda: not server.gate.busy, 5)
    monkeypatch.undo()
    status, reply = request(served, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 3
    after = scrape(server)
    assert value(after, "hat_api_generations", "hat_api_generations_total", finish_reason="cancelled") \
        == value(before, "hat_api_generations", "hat_api_generations_total", finish_reason="cancelled") + 1


def test_a_client_gone_while_waiting_leaves_the_queue(served):
    """A queued request whose client goes away leaves the queue at once (it would never get its turn)."""
    server = served.server
    with device_held(server):
        sock = raw_post(server, {"prompt": PROMPT, "max_tokens": 2})
        assert wait_until(lambda: server.gate.waiting == 1)
        sock.close()
        assert wait_until(lambda: server.gate.waiting == 0, 5)
    assert wait_until(lambda: not server.gate.busy, 5)


def test_a_full_queue_gets_503_at_once(served):
    """With max_queue requests waiting, one more gets 503 (busy) at once, not after the queue timeout."""
    with second_server(served, max_queue=1, queue_timeout_s=60.0) as server, device_held(server):
        waiting = raw_post(server, {"prompt": PROMPT, "max_tokens": 2})
        assert wait_until(lambda: server.gate.waiting == 1)
        began = time.monotonic()
        conn = http.client.HTTPConnection(*server.address, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 2}))
        response = conn.getresponse()
        reply = json.loads(response.read())
        assert response.status == 503 and reply["error"]["code"] == "busy"
        assert time.monotonic() - began < 10  # (the queue timeout is 60 s)
        waiting.close()
        conn.close()


def test_keep_alive_serves_many_requests_on_one_connection(served):
    """GET, POST, a streamed POST and GET again on one HTTP/1.1 connection: one socket throughout."""
    conn = http.client.HTTPConnection(*served.server.address, timeout=60)
    conn.request("GET", "/health")
    first = conn.getresponse()
    assert first.status == 200 and json.loads(first.read())["status"] == "ok"
    sock = conn.sock
    for body in ({"prompt": PROMPT, "max_tokens": 3, "temperature": 0},
                 {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}):
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200 and (text.rstrip().endswith("data: [DONE]") if body.get("stream") else
                                           json.loads(text)["usage"]["completion_tokens"] <= 3)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read() and conn.sock is sock
    conn.close()


def test_a_stalled_head_or_body_times_out(served):
    """read_timeout_s bounds a request's head (the connection is closed) and its body (408, OpenAI's error body)."""
    with second_server(served, read_timeout_s=0.5) as server:
        head = socket.create_connection(server.address, timeout=10)
        head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")  # and nothing more
        began = time.monotonic()
        assert head.recv(1024) == b"" and time.monotonic() - began < 8
        head.close()
        body = socket.create_connection(server.address, timeout=10)
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = body.recv(65536)
            assert chunk, answer
            answer += chunk
        body.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "timeout"


def test_the_device_metrics_follow_a_generation(served):
    """/metrics parses with prometheus_client's parser; one completion moves requests, TTFT (one), TBT (one per
    token after the first), accepted length (one per decode round) and the data-plane bytes (as `hat` reports)."""
    server = served.server
    before = scrape(server)
    status, reply = request(served, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": NEW_TOKENS,
                                                                "temperature": 0})
    after = scrape(server)
    assert status == 200
    tokens, hat = reply["usage"]["completion_tokens"], reply["hat"]

    def delta(name, sample=None, **labels):
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    assert {f.type for f in after.values()} == {"counter", "gauge", "histogram"}
    assert delta("hat_api_requests", "hat_api_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("hat_api_generations", "hat_api_generations_total", finish_reason=reply["choices"][0]
                 ["finish_reason"]) == 1
    assert delta("hat_api_ttft_seconds", "hat_api_ttft_seconds_count") == 1
    assert delta("hat_api_ttft_seconds", "hat_api_ttft_seconds_sum") == pytest.approx(hat["ttft_ms"] / 1000)
    assert delta("hat_api_tbt_seconds", "hat_api_tbt_seconds_count") == tokens - 1
    assert delta("hat_api_accept_length", "hat_api_accept_length_count") == tokens - 1  # no speculation: 1 a round
    assert delta("hat_api_accept_length", "hat_api_accept_length_sum") == tokens - 1
    assert delta("hat_api_bytes_up", "hat_api_bytes_up_total") == hat["bytes_up"] > 0
    assert delta("hat_api_bytes_down", "hat_api_bytes_down_total") == hat["bytes_down"] > 0
    assert value(after, "hat_api_queue_length") == 0 and value(after, "hat_api_generation_running") == 0
    info = [s.labels for s in after["hat_api_backend_info"].samples]
    assert info == [{"backend": "torch", "model": MODEL, "speculative": "false"}]


def test_stop_answers_waiting_requests_and_returns(served):
    """stop() while a request waits for the device: it gets 503 (shutting_down) at once and stop() returns well
    within its queue timeout."""
    server = OpenAIServer(served.server.generator, "unused", ServeConfig(port=0, queue_timeout_s=60.0,
                                                                          shutdown_s=1.0, model_name=MODEL)).start()
    loop = server.http.loop
    asyncio.run_coroutine_threadsafe(server.gate.acquire(30), loop).result(30)  # held for good: stop() must not wait
    replies = []
    waiter = threading.Thread(target=lambda: replies.append(request_to(server, {"prompt": PROMPT, "max_tokens": 2})))
    waiter.start()
    assert wait_until(lambda: server.gate.waiting == 1)
    began = time.monotonic()
    server.stop()
    waiter.join(30)
    assert time.monotonic() - began < 15 and loop.is_closed()
    assert replies and replies[0][0] == 503 and replies[0][1]["error"]["code"] == "shutting_down"


def request_to(server: OpenAIServer, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.address, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body))
    response = conn.getresponse()
    reply = response.status, json.loads(response.read())
    conn.close()
    return reply


def test_sigint_mid_stream_stops_hat_device_serve_cleanly(served):
    """`hat device serve` streaming a long generation: SIGINT ends the process with status 0 and no traceback, the
    generation ended at once (--shutdown-timeout 0), and the stream ends with OpenAI's error event (shutting_down)."""
    assert len(served.greedy(served.tokenizer(PROMPT)["input_ids"], LONG)) == LONG  # no end-of-sequence: only a stop
    with serve_process(served, "--shutdown-timeout", "0", "--telemetry-interval", "0") as (proc, url, model):
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(APIError, match="shutting down"):
            for _ in chunks:
                pass
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        errors = proc.stderr.read()
        assert "Traceback" not in errors, errors
