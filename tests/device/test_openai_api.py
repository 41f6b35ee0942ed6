"""`hat device serve`'s OpenAI-compatible API, driven by the official `openai` client and by raw HTTP.

transformers is the oracle: a temperature-0 completion (streamed or not) must be the text of
`generate(do_sample=False)` for the same prompt ids, chat completions the same for the prompt the tokenizer's
chat template makes, and the usage counts those token counts. Malformed requests must get OpenAI-style error
bodies with the right status, and leave the server serving. One tiny llama split 2/1, one in-process cloud and
one API server (on a free loopback port, in a thread) serve the whole module; one test runs `hat device serve`
itself as a process against the same cloud.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from openai import BadRequestError, NotFoundError, OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster import Cluster, running_cloud
from hat.device.device_model import DeviceModel
from hat.device.openai_api import OpenAIServer, ServeConfig
from hat.device.openai_schema import StopCutter, chat_prompt

MODEL = "tiny-llama"
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 12
MAX_BODY = 4096
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "for x in range(10):"}]


@dataclass
class Served:
    server: OpenAIServer
    cluster: Cluster
    hf: AutoModelForCausalLM  # the whole model, for the oracle
    tokenizer: AutoTokenizer  # with TEMPLATE

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.server.url, api_key="unused", max_retries=0, timeout=60)

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new_tokens: int = NEW_TOKENS) -> list[int]:
        out = self.hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=max_new_tokens)
        return out[0, len(ids):].tolist()

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    model_dir = tiny_checkpoint("llama3")
    with running_cloud(model_dir, 2, 1, tmp_path_factory.mktemp("openai")) as cluster:
        model = DeviceModel.load(cluster.device_dir)
        model.tokenizer.chat_template = TEMPLATE
        config = ServeConfig(port=0, queue_timeout_s=0.5, max_body_bytes=MAX_BODY, read_timeout_s=10.0,
                             model_name=MODEL)
        with cluster.generator(model) as gen, OpenAIServer(gen, "unused", config) as server:
            yield Served(server, cluster, AutoModelForCausalLM.from_pretrained(model_dir).eval(), model.tokenizer)


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].to_dict()["hat"]["chat_template"] == "tokenizer"
    assert models.data[0].to_dict()["hat"]["backend"] == "torch"
    status, body = request(served, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_completion_matches_transformers(served):
    ids = served.tokenizer(PROMPT)["input_ids"]
    expected = served.greedy(ids)
    resp = served.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert resp.object == "text_completion" and resp.model == MODEL
    assert resp.choices[0].text == served.text(expected)
    assert resp.choices[0].finish_reason == ("stop" if expected[-1] == served.tokenizer.eos_token_id else "length")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), len(expected))
    assert resp.usage.total_tokens == len(ids) + len(expected)
    hat = resp.to_dict()["hat"]
    assert hat["ttft_ms"] > 0 and hat["bytes_up"] > 0 and hat["bytes_down"] > 0 and sum(hat["chunks"]) == len(ids)
    assert set(hat) == {"ttft_ms", "tbt_ms", "accept_len", "speculative", "chunks", "bytes_up", "bytes_down"}


def test_streamed_completion_equals_plain(served):
    client = served.client()
    plain = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=NEW_TOKENS, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did stream
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage: no usage chunk
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_chat_completion_uses_the_template(served):
    prompt, templated = chat_prompt(served.tokenizer, MESSAGES)
    assert templated and prompt.startswith(served.tokenizer.bos_token) and prompt.endswith("<|assistant|>\n")
    ids = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the template adds <s> itself
    expected = served.text(served.greedy(ids))
    client = served.client()
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == expected
    assert resp.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == resp.choices[0].finish_reason
    assert chunks[-1].usage == resp.usage


def test_stop_strings_cut_the_text(served):
    client = served.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0).choices[0].text
    start = next(i for i in range(2, len(full) - 1) if full[i] not in full[:i])  # a first occurrence, not at 0
    stop = full[start:start + 2]
    for stops in (stop, ["never-produced", stop]):
        resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stop=stops)
        assert resp.choices[0].text == full[:start] and resp.choices[0].finish_reason == "stop"
        assert 0 < resp.usage.completion_tokens <= NEW_TOKENS
        streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                                  stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == full[:start]
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_stop_cutter_holds_back_possible_stops():
    cutter = StopCutter(("ab", "xyz"))
    out = [cutter.feed(c) for c in "12a3xyq4a"]
    assert "".join(out) + cutter.finish() == "12a3xyq4a" and out[2] == "" and out[4] == out[5] == ""
    cutter = StopCutter(("ab", "xyz"))
    assert "".join(cutter.feed(c) for c in "12xa4abab") == "12xa4" and cutter.stopped and cutter.finish() == ""
    assert StopCutter(("xyz",)).feed("123xyz456") == "123"


def test_chat_without_a_template_falls_back_to_role_lines():
    class NoTemplate:
        chat_template = None

    assert chat_prompt(NoTemplate(), MESSAGES) == ("system: You write Python.\nuser: for x in range(10):\nassistant:",
                                                   False)


def test_openai_client_sees_errors(served):
    client = served.client()
    with pytest.raises(BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, n=2)
    with pytest.raises(NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)


@pytest.mark.parametrize("method,path,body,status,param", [
    ("POST", "/v1/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("POST", "/v1/completions", {"prompt": PROMPT, "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {"prompt": PROMPT, "stop": [1]}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": PROMPT, "echo": True}, 400, "echo"),
    ("POST", "/v1/completions", {"prompt": "x " * 1000}, 400, "prompt"),  # longer than the context
    ("POST", "/v1/completions", {"prompt": "x" * MAX_BODY}, 413, None),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ("GET", "/v1/nowhere", None, 404, None),
    ("POST", "/v1/models", {}, 405, None),
    ("GET", "/v1/completions", None, 405, None),
    ("DELETE", "/v1/chat/completions", None, 405, None),
])
def test_malformed_requests_get_openai_errors(served, method, path, body, status, param):
    got, reply = request(served, method, path, body)
    assert got == status, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_busy_device_gets_503_then_serves(served):
    with device_held(served.server):
        status, reply = request(served, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 503 and reply["error"]["code"] == "busy" and reply["error"]["type"] == "server_error"
    # a connection that sends nothing does not hold anything up, and after every refusal a request still works
    idle = http.client.HTTPConnection(*served.server.address)
    idle.connect()
    status, reply = request(served, "POST", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3,
                                                                "temperature": 0})
    idle.close()
    assert status == 200 and reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] <= 3


def test_hat_device_serve_process(served):
    """The command itself: ready line, /v1/models, a completion, SIGTERM ends it cleanly."""
    with serve_process(served, "--default-max-tokens", "3") as (proc, url, model):
        assert model == served.server.generator.model.manifest.source_name  # the checkpoint's folder name
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [model]
        assert client.completions.create(model=model, prompt=PROMPT, temperature=0).usage.completion_tokens <= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@contextmanager
def serve_process(served, *flags: str):
    """`hat device serve FLAGS` as a process against the module's cloud: (the process, its API's URL, the model id)
    once it is ready; killed at the end if still running."""
    cluster = served.cluster
    command = [sys.executable, "-m", "hat.cli.main", "device", "serve", "--bundle", str(cluster.device_dir),
               "--cloud", "127.0.0.1", "--data-port", str(cluster.data_port), "--control-port",
               str(cluster.control_port), "--port", "0", "--threads", "1", *flags]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, line.split()[1], line.split()[2].removeprefix("model=")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def device_held(server: OpenAIServer):
    """The device taken as a running generation takes it: through the server's gate, on the server's loop."""
    asyncio.run_coroutine_threadsafe(server.gate.acquire(30), server.http.loop).result(timeout=30)
    try:
        yield
    finally:
        server.http.loop.call_soon_threadsafe(server.gate.release)


def request(served, method: str, path: str, body=None) -> tuple[int, dict]:
    """One raw HTTP request; (status, the JSON body)."""
    host, port = served.server.address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload
