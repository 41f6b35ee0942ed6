"""How the device's API runs generations: one at a time, through a gate requests queue at in arrival order
(bounded in length and in wait), each on the generation thread, its text handed to the event loop as it comes,
and cancellable from the loop (a client gone) before its next round."""
from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .openai_schema import ApiError, GenerationRequest, StopCutter

if TYPE_CHECKING:
    from .generator import SplitGenerator


class _StopString(Exception):
    """Raised from the text callback to end a generation at a stop string."""


@dataclass(slots=True)
class Outcome:
    """One finished generation as the API reports it."""
    text: str  # the completion, cut before a stop string
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int  # tokens in the prompt
    completion_tokens: int  # tokens generated (re-counted from the text when a stop string ended it early)
    hat: dict  # timing and traffic: ttft_ms, tbt_ms (mean), accept_len, speculative, chunks, bytes_up, bytes_down
    tbt_s: list[float] = field(default_factory=list)  # every time between tokens, seconds (for the TBT histogram)
    round_gains: list[int] = field(default_factory=list)  # tokens gained per decode round (accepted drafts + 1)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def run_generation(generator: SplitGenerator, request: GenerationRequest, ids: list[int],
                   on_delta: Callable[[str], None], cancel: threading.Event) -> Outcome:
    """One generation (blocking; the caller holds the gate); `on_delta(text)` gets the text as it comes. Raises
    ApiError for the generator's refusals and a lost cloud, GenerationCancelled once `cancel` is set."""
    from .cloud_link import CloudError

    gen, tokenizer, cutter, times = generator, generator.model.tokenizer, StopCutter(request.stop), []
    up0, down0, started = gen.link.bytes_up, gen.link.bytes_down, time.perf_counter()

    def on_text(delta: str) -> None:
        times.append(time.perf_counter())
        out = cutter.feed(delta)
        if out:
            on_delta(out)
        if cutter.stopped:
            raise _StopString

    try:
        result = gen.generate_ids(ids, request.max_tokens, request.sampling, on_text, started, cancel)
    except _StopString:
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
            "bytes_up": result.bytes_up, "bytes_down": result.bytes_down},
            [ms / 1000 for ms in result.tbt_ms], [s.accepted + 1 for s in result.decode_rounds])
    gaps = [b - a for a, b in zip(times, times[1:])]
    return Outcome(cutter.text, "stop", len(ids), len(tokenizer(cutter.seen, add_special_tokens=False)["input_ids"]), {
        "ttft_ms": (times[0] - started) * 1000 if times else 0.0,
        "tbt_ms": statistics.mean(gaps) * 1000 if gaps else 0.0, "accept_len": None,
        "speculative": gen.speculation is not None, "chunks": None,
        "bytes_up": gen.link.bytes_up - up0, "bytes_down": gen.link.bytes_down - down0}, gaps)


def _busy(message: str, code: str) -> ApiError:
    return ApiError(503, message, "server_error", code=code)


class GenerationGate:
    """One generation at a time; requests wait their turn in arrival order, at most `max_waiting` of them, each for
    at most its timeout (then 503). Lives on one event loop: call it from that loop only."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.busy = False  # a generation holds the device
        self.closed = False  # shutting down: waiting and new requests get 503
        self._waiters: deque[asyncio.Future] = deque()  # turns not yet given, oldest first

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take(self) -> bool:
        """Take the device if it is free and nobody waits; False otherwise (then `acquire` waits for it)."""
        if self.busy or self._waiters or self.closed:
            return False
        self.busy = True
        return True

    async def acquire(self, timeout_s: float) -> None:
        """Wait for the device (ApiError 503 if closed, the queue is full, or `timeout_s` passes); the caller then
        owns it until `release()`."""
        if self.closed:
            raise _busy("the server is shutting down", "shutting_down")
        if self.take():
            return
        if len(self._waiters) >= self.max_waiting:
            raise _busy(f"the device is busy and {len(self._waiters)} requests already wait; retry later", "busy")
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._waiters.append(turn)
        timer = loop.call_later(timeout_s, self._expire, turn, _busy(
            f"the device is busy with another generation (waited {timeout_s:g} s); retry later", "busy"))
        try:
            await turn
        except asyncio.CancelledError:  # the request went away; a turn it was given passes to the next
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.release()
            raise
        finally:
            timer.cancel()
            if turn in self._waiters:
                self._waiters.remove(turn)

    def release(self) -> None:
        """The generation ended: the oldest waiting request gets the device."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.busy = False

    def close(self) -> None:
        """Refuse new requests and answer the waiting ones 503 (the running generation is not touched)."""
        self.closed = True
        for turn in self._waiters:
            if not turn.done():
                turn.set_exception(_busy("the server is shutting down", "shutting_down"))

    @staticmethod
    def _expire(turn: asyncio.Future, error: ApiError) -> None:
        if not turn.done():
            turn.set_exception(error)


_END = object()  # the generation thread's last item


def _ignore(text: str) -> None:
    pass


class GenerationJob:
    """`run(on_delta, cancel)` on `executor` (the generation thread); with `stream`, `deltas()` yields its text on
    the event loop as it comes (without, the text stays on the generation thread: no wake-up of the loop a delta);
    `outcome()` its result. `cancel()` (from the loop) ends it before its next round."""

    def __init__(self, run: Callable[[Callable[[str], None], threading.Event], Outcome], executor: Executor,
                 stream: bool):
        self.loop = asyncio.get_running_loop()
        self._cancel = threading.Event()
        self._deltas: asyncio.Queue = asyncio.Queue()
        self.future: asyncio.Future = self.loop.run_in_executor(executor, self._run, run, stream)

    def _run(self, run, stream: bool) -> Outcome:
        try:
            return run(self._hand_over if stream else _ignore, self._cancel)
        finally:
            self._hand_over(_END)

    def _hand_over(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deltas.put_nowait, item)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is listening
            pass

    def cancel(self) -> None:
        self._cancel.set()

    async def deltas(self) -> AsyncIterator[str]:
        while (item := await self._deltas.get()) is not _END:
            yield item

    async def outcome(self) -> Outcome:
        return await asyncio.shield(self.future)  # a cancelled caller does not cancel the thread's result
