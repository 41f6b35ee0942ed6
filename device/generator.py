"""Split generation: the device runs input and output parts, the cloud the middle, only hidden states cross."""
from __future__ import annotations

import time
import secrets
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from hat.common.layers import SequenceSpan
from hat.common.sampling import SamplingParams, sample_token

from .cloud_link import CloudLink
from .device_model import DeviceModel


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context."""


@dataclass(slots=True)
class StepTiming:
    """Where one round's time went (milliseconds)."""
    tokens: int  # positions sent in this round
    device_ms: float  # input part + output layers on the device (the final norm, head and sampling are not in it)
    round_ms: float  # send to reply, as the device saw it
    cloud_compute_ms: float  # the middle-part forward, as the cloud measured it


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]  # generated ids only (an end-of-sequence id included when it ended the generation)
    text: str  # decoded generated text, special tokens skipped
    prompt_tokens: int  # length of the tokenized prompt
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens or the context filled)
    ttft_ms: float  # from the call to the first generated token
    tbt_ms: list[float] = field(default_factory=list)  # one per token after the first: time since the previous token
    bytes_up: int = 0  # data-plane bytes sent (headers + hidden states)
    bytes_down: int = 0  # data-plane bytes received
    steps: list[StepTiming] = field(default_factory=list)  # per round, for benchmarks (not in to_json)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["steps"]
        out["device_ms"] = sum(s.device_ms for s in self.steps)
        out["cloud_compute_ms"] = sum(s.cloud_compute_ms for s in self.steps)
        out["network_ms"] = sum(s.round_ms - s.cloud_compute_ms for s in self.steps)
        return out


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text, self.emitted = tokenizer, on_text, ""

    def update(self, token_ids: list[int], final: bool = False) -> None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if self.on_text is not None and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
        self.emitted = text


class SplitGenerator:
    def __init__(self, model: DeviceModel, link: CloudLink):
        self.model, self.link = model, link
        self.max_context = model.spec.max_context
        self.max_message_tokens = self.max_context  # the cloud's per-message limit: longer prompts go in pieces
        registration = link.registration
        if registration is not None:
            self.max_context = min(self.max_context, registration.max_context or self.max_context)
            self.max_message_tokens = registration.max_tokens_per_message or self.max_message_tokens

    def encode(self, prompt: str) -> list[int]:
        return self.model.tokenizer(prompt)["input_ids"]

    def generate(self, prompt: str, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        started = time.perf_counter()
        return self.generate_ids(self.encode(prompt), max_new_tokens, sampling, on_text, started)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                     on_text: Callable[[str], None] | None = None, started: float | None = None) -> GenerationResult:
        started = time.perf_counter() if started is None else started
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(prompt_ids) >= self.max_context:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                                     f"{self.max_context} tokens, which leaves no room to generate")
        budget = min(max_new_tokens, self.max_context - len(prompt_ids))
        up0, down0 = self.link.bytes_up, self.link.bytes_down
        rng = sampling.make_generator()
        stream = TextStream(self.model.tokenizer, on_text)
        session_id = secrets.token_hex(6)  # 48 random bits: sessions are per connection, ids stay short on the wire
        self.link.open_session(session_id)
        try:
            caches = (self.model.input_part.new_cache(), self.model.output_part.new_cache())
            generated: list[int] = []
            token_times: list[float] = []
            steps: list[StepTiming] = []
            logits = self._run(session_id, prompt_ids, 0, caches, steps)
            finish = "length"
            while True:
                token = sample_token(logits, sampling, rng)
                generated.append(token)
                token_times.append(time.perf_counter())
                if on_text is not None:
                    stream.update(generated)
                if token in self.model.stop_ids:
                    finish = "stop"
                    break
                if len(generated) == budget:
                    break
                logits = self._run(session_id, [token], len(prompt_ids) + len(generated) - 1, caches, steps)
            stream.update(generated, final=True)
        finally:
            self._close_quietly(session_id)
        return GenerationResult(
            token_ids=generated, text=stream.emitted, prompt_tokens=len(prompt_ids), finish_reason=finish,
            ttft_ms=(token_times[0] - started) * 1000,
            tbt_ms=[(b - a) * 1000 for a, b in zip(token_times, token_times[1:])],
            bytes_up=self.link.bytes_up - up0, bytes_down=self.link.bytes_down - down0, steps=steps)

    def _run(self, session_id: str, token_ids: list[int], position: int, caches, steps: list[StepTiming]) -> torch.Tensor:
        """Run tokens at `position` through input part, cloud and output part, in messages of at most the
        cloud's per-message limit, recording each round. Returns the logits of the last token."""
        model = self.model
        input_cache, output_cache = caches
        needs_all = model.output_part.num_layers > 0  # output layers need every position for their own cache
        for start in range(0, len(token_ids), self.max_message_tokens):
            began = time.perf_counter()
            chunk = token_ids[start:start + self.max_message_tokens]
            chunk_position, count = position + start, len(chunk)
            hidden = model.input_part.forward_layers(
                model.input_part.embed(torch.tensor(chunk)), [SequenceSpan(input_cache, chunk_position, count)])
            sent = time.perf_counter()
            reply = self.link.forward(session_id, chunk_position, hidden, return_last=0 if needs_all else 1)
            round_ms = (time.perf_counter() - sent) * 1000
            middle = reply.tensor
            if needs_all:
                middle = model.output_part.forward_layers(middle, [SequenceSpan(output_cache, chunk_position, count)])
            step_ms = (time.perf_counter() - began) * 1000
            steps.append(StepTiming(count, step_ms - round_ms, round_ms, reply.header.compute_us / 1000))
        return model.output_part.logits(middle[-1:].to(model.output_part.dtype))[0]

    def _close_quietly(self, session_id: str) -> None:
        try:
            self.link.close_session(session_id)
        except Exception:  # the cloud may be gone; its idle expiry frees the session then
            pass
