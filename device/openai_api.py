"""`hat device serve`'s local OpenAI-compatible HTTP API (standard library only).

GET /v1/models, GET /health, POST /v1/completions and /v1/chat/completions, plain JSON or Server-Sent Events
(`stream: true`). Responses follow OpenAI's schema, plus a `hat` object with the generation's timing.

The device holds one model, so one generation runs at a time: a request waits for the running one for at
most `queue_timeout_s`, then gets 503. Requests are checked before they wait (400 for malformed ones). Every
socket operation has a `read_timeout_s` timeout, bodies over `max_body_bytes` are refused (413) unread, and a
client that goes away mid-stream ends its generation. Errors carry OpenAI's `{"error": {...}}` body.
"""
from __future__ import annotations

import json
import logging
import secrets
import statistics
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from .openai_schema import ApiError, GenerationRequest, StopCutter, parse_chat, parse_completion

if TYPE_CHECKING:
    from .generator import SplitGenerator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = LOOPBACK  # address to bind; anything but loopback lets others on the network use the model
    port: int = 8000  # TCP port (0: any free port)
    queue_timeout_s: float = 30.0  # longest wait for the running generation to finish before answering 503
    max_body_bytes: int = 1 << 20  # larger request bodies are refused with 413
    read_timeout_s: float = 30.0  # timeout of every socket read (and write) on a client connection
    default_max_tokens: int = 16  # max_tokens when a request leaves it out (OpenAI's completions default)
    model_name: str = ""  # the model id served (empty: the caller's choice, usually the bundle's model name)


class _Stopped(Exception):
    """Raised from the text callback to end a generation early (a stop string; a client gone)."""


@dataclass(slots=True)
class Outcome:
    """One finished generation as the API reports it."""
    text: str  # the completion, cut before a stop string
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int  # tokens in the prompt
    completion_tokens: int  # tokens generated (re-counted from the text when a stop string ended it early)
    hat: dict  # timing and traffic: ttft_ms, tbt_ms (mean), accept_len, speculative, chunks, bytes_up, bytes_down

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class OpenAIServer:
    """The API over one registered SplitGenerator. `start()` serves on a thread; `stop()` ends it."""

    def __init__(self, generator: SplitGenerator, model_id: str, config: ServeConfig = ServeConfig()):
        self.generator, self.model_id, self.config = generator, config.model_name or model_id, config
        self.tokenizer = generator.model.tokenizer
        self.chat_template = "tokenizer" if getattr(self.tokenizer, "chat_template", None) else "fallback"
        if self.chat_template == "fallback":
            log.warning("the tokenizer has no chat template: chat messages are sent as 'role: content' lines")
        self.lock = threading.Lock()  # one generation at a time
        self.created = int(time.time())
        handler = type("Handler", (_Handler,), {"api": self, "timeout": config.read_timeout_s})
        self.httpd = ThreadingHTTPServer((config.host, config.port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="openai-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "hat",
            "hat": {"chat_template": self.chat_template, "max_context": self.generator.max_context,
                    "speculative": self.generator.speculation is not None, "backend": self.generator.model.backend}}]}

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        ids = self.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        if len(ids) >= self.generator.max_context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is "
                                f"{self.generator.max_context} tokens, which leaves no room to generate",
                           param="messages" if request.chat else "prompt", code="context_length_exceeded")
        return ids

    def generate(self, request: GenerationRequest, ids: list[int], on_delta) -> Outcome:
        """Run one generation (the caller holds the lock); `on_delta(text)` gets the text as it comes."""
        from .cloud_link import CloudError

        gen, cutter, times = self.generator, StopCutter(request.stop), []
        up0, down0, started = gen.link.bytes_up, gen.link.bytes_down, time.perf_counter()

        def on_text(delta: str) -> None:
            times.append(time.perf_counter())
            out = cutter.feed(delta)
            if out:
                on_delta(out)
            if cutter.stopped:
                raise _Stopped

        try:
            result = gen.generate_ids(ids, request.max_tokens, request.sampling, on_text, started)
        except _Stopped:
            result = None
        except ValueError as exc:  # the generator's refusals of the prompt or the budget
            raise ApiError(400, str(exc)) from None
        except CloudError as exc:
            raise ApiError(503, f"the cloud did not serve the request: {exc}", "server_error",
                           code="cloud_unavailable") from None
        tail = cutter.finish()
        if tail:
            on_delta(tail)
        if result is not None and not cutter.stopped:
            return Outcome(cutter.text, result.finish_reason, len(ids), len(result.token_ids), {
                "ttft_ms": result.ttft_ms, "tbt_ms": statistics.mean(result.tbt_ms) if result.tbt_ms else 0.0,
                "accept_len": result.accept_len, "speculative": result.speculative, "chunks": result.chunks,
                "bytes_up": result.bytes_up, "bytes_down": result.bytes_down})
        gaps = [b - a for a, b in zip(times, times[1:])]
        return Outcome(cutter.text, "stop", len(ids),
                       len(self.tokenizer(cutter.seen, add_special_tokens=False)["input_ids"]), {
                           "ttft_ms": (times[0] - started) * 1000 if times else 0.0,
                           "tbt_ms": statistics.mean(gaps) * 1000 if gaps else 0.0, "accept_len": None,
                           "speculative": gen.speculation is not None, "chunks": None,
                           "bytes_up": gen.link.bytes_up - up0, "bytes_down": gen.link.bytes_down - down0})


class _Handler(BaseHTTPRequestHandler):
    api: OpenAIServer  # set on the subclass each server makes
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when the connection closes
    server_version = "hat-device"

    def log_message(self, format, *args):  # through logging, not stderr
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        routes = {"/v1/models": ("GET", self._models), "/health": ("GET", self._health),
                  "/v1/completions": ("POST", self._completions), "/v1/chat/completions": ("POST", self._chat)}
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path not in routes:
                raise ApiError(404, f"Unknown path: {method} {path}", code="unknown_url")
            allowed, handle = routes[path]
            if method != allowed:
                raise ApiError(405, f"{method} is not allowed on {path}; use {allowed}", code="method_not_allowed")
            handle()
        except ApiError as exc:
            self._json(exc.status, exc.body())
        except OSError:  # the connection broke or timed out: nothing more can be said on it
            self.close_connection = True
        except Exception as exc:
            log.exception("request failed")
            self._json(500, ApiError(500, f"internal error: {exc}", "server_error").body())

    def _models(self) -> None:
        self._json(200, self.api.models())

    def _health(self) -> None:
        self._json(200, {"status": "ok", "model": self.api.model_id})

    def _completions(self) -> None:
        api = self.api
        self._generate(parse_completion(self._body(), api.model_id, api.config.default_max_tokens))

    def _chat(self) -> None:
        api = self.api
        self._generate(parse_chat(self._body(), api.model_id, api.config.default_max_tokens, api.tokenizer))

    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(400, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(400, "a POST needs a valid Content-Length header") from None
        if length < 0:
            raise ApiError(400, "a POST needs a valid Content-Length header")
        if length > self.api.config.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"the request body has {length} bytes; the limit is {self.api.config.max_body_bytes}",
                           code="request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ApiError(400, "the request body ended early")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def _generate(self, request: GenerationRequest) -> None:
        api = self.api
        ids = api.prompt_ids(request)
        if not api.lock.acquire(timeout=api.config.queue_timeout_s):
            raise ApiError(503, f"the device is busy with another generation (waited "
                                f"{api.config.queue_timeout_s:g} s); retry later", "server_error", code="busy")
        try:
            if request.stream:
                self._stream(request, ids)
            else:
                outcome = api.generate(request, ids, lambda text: None)
                self._json(200, self._response(request, outcome))
        finally:
            api.lock.release()

    def _response(self, request: GenerationRequest, outcome: Outcome) -> dict:
        if request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
        return {**self._head(request, chunk=False), "choices": [choice], "usage": outcome.usage(), "hat": outcome.hat}

    def _head(self, request: GenerationRequest, chunk: bool) -> dict:
        if not hasattr(self, "_id"):
            self._id = ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.chat else "text_completion"
        return {"id": self._id, "object": kind, "created": int(time.time()), "model": self.api.model_id}

    def _stream(self, request: GenerationRequest, ids: list[int]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        extra = {"usage": None} if request.include_usage else {}

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> dict:
            if request.chat:
                content = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": {"role": "assistant", **content} if role else content}
            else:
                choice = {"index": 0, "text": delta or ""}
            return {**self._head(request, chunk=True), "choices": [{**choice, "logprobs": None,
                                                                   "finish_reason": finish}], **extra}

        gone = []

        def send(text: str) -> None:
            try:
                self._event(chunk(text))
            except OSError:  # the client went away: end the generation
                gone.append(True)
                raise _Stopped from None

        if request.chat:
            self._event(chunk("", role=True))
        try:
            outcome = self.api.generate(request, ids, send)
        except ApiError as exc:
            self._event(exc.body())
        except Exception as exc:  # the 200 is out: the error goes in the stream
            log.exception("streamed generation failed")
            self._event(ApiError(500, f"internal error: {exc}", "server_error").body())
        else:
            if gone:
                return
            self._event({**chunk(None, outcome.finish_reason), "hat": outcome.hat})
            if request.include_usage:
                self._event({**self._head(request, chunk=True), "choices": [], "usage": outcome.usage(),
                             "hat": outcome.hat})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
