"""`hat device serve`'s local OpenAI-compatible HTTP API: FastAPI on uvicorn, on a thread of its own.

GET /v1/models, GET /health, GET /metrics (Prometheus), POST /v1/completions and /v1/chat/completions, plain JSON
or Server-Sent Events (`stream: true`). Responses follow OpenAI's schema, plus a `hat` object with the generation's
timing. HTTP/1.1 keep-alive; errors carry OpenAI's `{"error": {...}}` body.

The device holds one model, so one generation runs at a time (api_generation.GenerationGate): requests are checked
first (400 for malformed ones), then wait in arrival order, at most `max_queue` of them, each for at most
`queue_timeout_s` (then 503). A request's head and body must each arrive within `read_timeout_s`, and each response
write must go out within it; bodies over `max_body_bytes` are refused (413) unread. A client that goes away, while
waiting or mid-generation, is seen at once (the ASGI disconnect message) and its generation ends before its next
round, which frees the device for the next request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from hat.common.metrics_endpoint import metrics_route
from hat.common.uvicorn_thread import HttpTimeouts, UvicornThread

from .api_generation import GenerationGate, GenerationJob, run_generation
from .api_metrics import ApiMetrics
from .api_responses import ClientGone, EventStream, Reply, shut_down_error, unless_gone
from .generator import GenerationCancelled
from .openai_schema import ApiError, GenerationRequest, parse_chat, parse_completion

if TYPE_CHECKING:
    from .generator import SplitGenerator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = LOOPBACK  # address to bind; anything but loopback lets others on the network use the model
    port: int = 8000  # TCP port (0: any free port)
    queue_timeout_s: float = 30.0  # longest wait for the running generation to finish before answering 503
    max_queue: int = 64  # requests waiting for the device beyond this many get 503 at once
    max_body_bytes: int = 1 << 20  # larger request bodies are refused with 413
    read_timeout_s: float = 30.0  # a request's head, its body, and each response write must take at most this
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    shutdown_s: float = 5.0  # on stop, requests in flight get this long to finish, then their generation ends
    default_max_tokens: int = 16  # max_tokens when a request leaves it out (OpenAI's completions default)
    model_name: str = ""  # the model id served (empty: the caller's choice, usually the bundle's model name)


def _wait(condition, timeout_s: float) -> bool:
    """Poll `condition` (from a thread other than the server's) until true or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class OpenAIServer:
    """The API over one registered SplitGenerator. `start()` serves on a thread; `stop()` ends it."""

    def __init__(self, generator: SplitGenerator, model_id: str, config: ServeConfig = ServeConfig()):
        self.generator, self.model_id, self.config = generator, config.model_name or model_id, config
        self.tokenizer = generator.model.tokenizer
        self.chat_template = "tokenizer" if getattr(self.tokenizer, "chat_template", None) else "fallback"
        if self.chat_template == "fallback":
            log.warning("the tokenizer has no chat template: chat messages are sent as 'role: content' lines")
        self.gate = GenerationGate(config.max_queue)
        link = generator.link
        self.metrics = ApiMetrics(lambda: self.gate.waiting, lambda: self.gate.busy,
                                  lambda: (link.bytes_up, link.bytes_down),
                                  {"backend": generator.model.backend, "model": self.model_id,
                                   "speculative": str(generator.speculation is not None).lower()})
        self.created = int(time.time())
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hat-generation")  # the generation thread
        self._job: GenerationJob | None = None  # the running generation
        timeouts = HttpTimeouts(head_s=config.read_timeout_s, write_s=config.read_timeout_s,
                                keep_alive_s=config.keep_alive_s, shutdown_s=config.shutdown_s)
        self.http = UvicornThread(_Guard(_app(self), self.metrics), config.host, config.port, "openai-api", timeouts,
                                  access_log=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.http.address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/v1"

    def start(self) -> "OpenAIServer":
        self.http.start()
        return self

    def stop(self) -> None:
        """Refuse new work and answer waiting requests 503; give the running generation `shutdown_s` to finish, then
        end it (its stream ends with a 503 error event); stop serving."""
        loop, grace = self.http.loop, self.config.shutdown_s
        if loop is not None and self._on_loop(loop, self.gate.close):
            if not _wait(lambda: not self.gate.busy, grace) and self._on_loop(loop, self._cancel_running):
                _wait(lambda: not self.gate.busy, grace)
        self.http.stop()
        self._executor.shutdown(wait=True)

    @staticmethod
    def _on_loop(loop: asyncio.AbstractEventLoop, call) -> bool:
        try:
            loop.call_soon_threadsafe(call)
            return True
        except RuntimeError:  # the loop has closed
            return False

    def _cancel_running(self) -> None:
        if self._job is not None:
            self._job.cancel()

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

    async def read_json(self, request: Request):
        """The request's JSON body: 413 past `max_body_bytes` (unread when Content-Length says so), 408 if it does
        not arrive within `read_timeout_s`, 400 if it is not JSON."""
        limit, length = self.config.max_body_bytes, request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body has {length} bytes; the limit is {limit}", code="request_too_large")
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise ApiError(413, f"the request body has more than {limit} bytes", code="request_too_large")

        try:
            await asyncio.wait_for(read(), self.config.read_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.config.read_timeout_s:g} s",
                           code="timeout") from None
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    async def generate(self, request: Request, chat: bool) -> Response:
        c = self.config
        try:
            body = await self.read_json(request)
        except ClientDisconnect:
            return Response(status_code=499)
        parsed = (parse_chat(body, self.model_id, c.default_max_tokens, self.tokenizer) if chat
                  else parse_completion(body, self.model_id, c.default_max_tokens))
        ids = self.prompt_ids(parsed)
        if not self.gate.take():  # the device is busy: wait in the queue, unless the client goes away
            try:
                await unless_gone(self.gate.acquire(c.queue_timeout_s), request.receive)
            except ClientGone:
                return Response(status_code=499)
        try:
            job = GenerationJob(partial(run_generation, self.generator, parsed, ids), self._executor, parsed.stream)
        except BaseException:
            self.gate.release()
            raise
        self._job = job
        job.future.add_done_callback(self._generation_ended)
        reply = Reply(parsed, self.model_id)
        if parsed.stream:
            return EventStream(reply, job)
        try:
            outcome = await unless_gone(job.outcome(), request.receive)
        except ClientGone:
            job.cancel()
            return Response(status_code=499)
        except GenerationCancelled:
            raise shut_down_error() from None
        return JSONResponse(reply.response(outcome))

    def _generation_ended(self, future: asyncio.Future) -> None:
        """On the loop, when the generation thread is done: the next request gets the device; the metrics."""
        self._job = None
        self.gate.release()
        error = GenerationCancelled() if future.cancelled() else future.exception()
        if error is None:
            self.metrics.generation(future.result())
        else:
            self.metrics.ended_early("cancelled" if isinstance(error, GenerationCancelled) else "error")


def _app(api: OpenAIServer) -> FastAPI:
    app = FastAPI(title="hat device API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        headers = {"Connection": "close"} if exc.status == 413 else None  # the body is left unread
        return JSONResponse(exc.body(), exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            error = ApiError(404, f"Unknown path: {method} {path}", code="unknown_url")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = ApiError(405, f"{method} is not allowed on {path}; use {allowed}", code="method_not_allowed")
        else:
            error = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), error.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:  # (uvicorn logs the traceback)
        return JSONResponse(ApiError(500, f"internal error: {exc}", "server_error").body(), 500)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(api.models())

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "model": api.model_id})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.generate(request, chat=True)

    app.router.routes.append(metrics_route(api.metrics.registry))
    return app


class _Guard:
    """The outermost ASGI layer: a path's trailing slash is dropped, and every answered request is counted by
    endpoint and status (499: the client went away first)."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        status = 499

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app({**scope, "path": path}, receive, counted_send)
        finally:
            self.metrics.request(path, status)
