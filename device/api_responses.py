"""What the device API sends back: OpenAI-shaped bodies (`Reply`), a generation's text as Server-Sent Events
(`EventStream`), and the watch for a client that goes away, which a stream and a waiting request both use."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from fastapi.responses import Response

from .api_generation import GenerationJob, Outcome
from .generator import GenerationCancelled
from .openai_schema import ApiError, GenerationRequest

log = logging.getLogger(__name__)


def shut_down_error() -> ApiError:
    return ApiError(503, "the server is shutting down: the generation was ended", "server_error", code="shutting_down")


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


async def _disconnected(receive) -> None:
    """Returns once the client is gone (after the body is read, an ASGI server's receive() waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(awaitable, receive):
    """`awaitable`'s result, unless the client disconnects first (ClientGone; `awaitable` is cancelled)."""
    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work not in done:
        raise ClientGone
    return work.result()


class Reply:
    """The OpenAI-shaped bodies of one request's answer (one id for all its chunks)."""

    def __init__(self, request: GenerationRequest, model_id: str):
        self.request, self.model_id = request, model_id
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)

    def head(self, chunk: bool) -> dict:
        chat = self.request.chat
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model_id}

    def response(self, outcome: Outcome) -> dict:
        if self.request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
        return {**self.head(chunk=False), "choices": [choice], "usage": outcome.usage(), "hat": outcome.hat}

    def chunk(self, delta: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.request.chat:
            content = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": {"role": "assistant", **content} if role else content}
        else:
            choice = {"index": 0, "text": delta or ""}
        extra = {"usage": None} if self.request.include_usage else {}
        return {**self.head(chunk=True), "choices": [{**choice, "logprobs": None, "finish_reason": finish}], **extra}

    def usage_chunk(self, outcome: Outcome) -> dict:
        return {**self.head(chunk=True), "choices": [], "usage": outcome.usage(), "hat": outcome.hat}


def _event(payload: dict | str) -> dict:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}


class EventStream(Response):
    """A generation's text as Server-Sent Events, while the client stays; once it goes, the generation ends."""

    def __init__(self, reply: Reply, job: GenerationJob):
        super().__init__(media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        del self.headers["content-length"]
        self.reply, self.job = reply, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await unless_gone(self._send_all(send), receive)
        except ClientGone:
            log.info("the client went away mid-stream: its generation ends")
        finally:
            self.job.cancel()  # (nothing to end once it has finished)

    async def _send_all(self, send) -> None:
        reply = self.reply
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if reply.request.chat:
            await send(_event(reply.chunk("", role=True)))
        async for text in self.job.deltas():
            await send(_event(reply.chunk(text)))
        try:
            outcome = await self.job.outcome()
        except GenerationCancelled:
            await send(_event(shut_down_error().body()))
        except ApiError as exc:
            await send(_event(exc.body()))
        except Exception as exc:  # the 200 is out: the error goes in the stream
            log.error("streamed generation failed", exc_info=exc)
            await send(_event(ApiError(500, f"internal error: {exc}", "server_error").body()))
        else:
            await send(_event({**reply.chunk(None, outcome.finish_reason), "hat": outcome.hat}))
            if reply.request.include_usage:
                await send(_event(reply.usage_chunk(outcome)))
        await send(_event("[DONE]"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
