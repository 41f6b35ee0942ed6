"""Fuzzing of `hat device serve`'s API, the device's network-facing decoder of app requests: random JSON bodies
through the request parser (a GenerationRequest or OpenAI's 400/404, nothing else), and mutated raw HTTP requests
against a running server (an HTTP answer with a known status, or a closed connection; never a 500; the server
serves a correct request afterwards)."""
from __future__ import annotations

import http.client
import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api_serving import second_server
from test_openai_api import MODEL, PROMPT, served  # noqa: F401 (a fixture)

from fuzzing import mutate
from hat.device.openai_schema import ApiError, GenerationRequest, parse_chat, parse_completion

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed",
          "stop", "stream", "stream_options", "echo", "suffix", "best_of", "logprobs", "tools", "role", "content",
          "type", "text", "include_usage", "user"]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.floats(allow_nan=False, allow_subnormal=False)
                    | st.text(max_size=6) | st.sampled_from(["user", "assistant", "text", MODEL, PROMPT]),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
                        st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5), max_leaves=16)
VALID = [{"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stop": ["\n"], "stream": True,
          "stream_options": {"include_usage": True}},
         {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 2,
          "model": MODEL, "n": 1, "top_p": 0.5, "seed": 3}]
ANSWERS = {200, 400, 404, 405, 408, 413, 503}


class NoTemplate:
    chat_template = None


def check_parse(body) -> None:
    for parse in (lambda b: parse_completion(b, MODEL, 16), lambda b: parse_chat(b, MODEL, 16, NoTemplate())):
        try:
            parsed = parse(body)
        except ApiError as exc:
            assert exc.status in (400, 404) and exc.message and set(exc.body()["error"]) == {
                "message", "type", "param", "code"}
        else:
            assert isinstance(parsed, GenerationRequest) and parsed.max_tokens >= 1 and len(parsed.stop) <= 4
            assert 0 <= parsed.sampling.temperature <= 2 and 0 < parsed.sampling.top_p <= 1


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8) | JSON)
def test_random_bodies_parse_or_get_openai_errors(body):
    check_parse(body)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_valid_bodies_parse_or_get_openai_errors(data):
    raw = mutate(data.draw, [json.dumps(data.draw(st.sampled_from(VALID))).encode()], max_edits=3)
    try:
        body = json.loads(b"".join(raw))
    except ValueError:
        return  # not JSON: the server answers 400 before parsing (checked over HTTP below)
    check_parse(body)


def raw_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


def test_mutated_http_requests_get_answers_and_leave_the_server_serving(served):
    """Mutated raw requests (head and body): each gets an HTTP answer with a known status, or its connection
    closed; never a 500. A correct request is served afterwards."""
    with second_server(served, read_timeout_s=0.3, keep_alive_s=0.3, queue_timeout_s=5.0) as server:
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data):
            frames = mutate(data.draw, [raw_request(data.draw(st.sampled_from(VALID)))], max_edits=4)
            with socket.create_connection(server.address, timeout=30) as sock:
                sock.sendall(b"".join(frames))
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            if answer:
                assert answer.startswith(b"HTTP/1.1 "), answer[:80]
                assert int(answer.split()[1]) in ANSWERS, answer[:200]

        fuzz()
        conn_ok = request_ok(server)
    assert conn_ok


def request_ok(server) -> bool:
    conn = http.client.HTTPConnection(*server.address, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 2, "temperature": 0}))
    response = conn.getresponse()
    ok = response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] <= 2
    conn.close()
    return ok
