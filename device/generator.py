"""Split generation: the device runs input and output parts, the cloud the middle, only hidden states cross.

The prompt goes through a pipelined, chunked prefill (`prefill`) cut by the chunk planner.
Decoding is plain (one token per cloud round) or speculative: the device drafts with its own parts and
the adapter, the cloud runs the middle layers once over the whole draft, the device verifies with the
lossless rules of `acceptance` and, while a verification is in flight, drafts the round after it.
If the cloud has lost the session (expired, restarted), the device re-sends its history and goes on.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq

from hat.common import wire
from hat.common.cost_fit import CostFit, attended
from hat.common.layers import SequenceSpan
from hat.common.proto import hat_pb2 as pb
from hat.common.sampling import SamplingParams, sample_token

from .acceptance import verify
from .chunk_planner import DEFAULT_CHUNKING, ChunkingConfig
from .cloud_link import CloudError, CloudLink, CloudTimeoutError
from .device_model import DeviceModel
from .device_profile import DeviceProfile
from .draft_head import DraftHead, reduced_head
from .draft_length import DraftLengthChooser, ParallelGuard
from .drafter import DeviceCaches, Draft, Drafter
from .link_estimator import LinkEstimator
from .prefill import PrefillPipeline, PrefillReport
from .speculation import SpeculationConfig
from .results import GenerationResult, StepTiming, TextStream, in_cloud_ms

RECOVERABLE = (pb.UNKNOWN_SESSION, pb.BAD_POSITION)  # the cloud lost the session's cache: re-send the history
log = logging.getLogger("hat.device")
MAX_RECOVERIES = 8  # per generation; beyond this the cloud's error is raised
RETRY_BACKOFF_S = (0.2, 4.0)  # first and longest wait between attempts to reach a cloud that stopped answering
_ROUND_EMA = 0.3  # weight of the newest round time in the predicted round time
_ROUND_FIT_WINDOW = 64  # verification rounds the round-time fit keeps
_MIN_ROUND_S = 1e-4  # floor of a predicted round time
PROBE_CHUNKS = (32, 128, 512, 512)  # the probe's scratch prompt, as chunks: small, medium and large forwards on every
# stage, the last after 672 cached positions (without a long-context timing a fit cannot tell attention from tokens)
PROBE_WHOLE = 1024  # then a scratch prompt of this many tokens (at most half the context) sent whole: a forward with
# no cached positions costs less than one after them (the attention runs causal, without a mask; the reference
# model's cloud on 2 shared cores: 512 tokens 110 ms at position 0, 128 ms after 160), and a first prompt, sent
# whole, is one: without it an 839-token first prompt on loopback was predicted 11-23% high
PROBE_WARMUPS = 1  # runs of the probe's largest forward (its whole scratch prompt) first, not learned from: a fresh
# path's first large forwards ran slower than later ones (reference model on loopback, a fresh cloud: its 1024-token
# forward at 199-253 ms in a first pass, 163-176 in the next, in 3 of 6 starts), so a fit of them put the first prompt
# 10-20% high; only the largest, as a whole second pass cost SmolLM2's start-up 4 s more (4.6 s -> 8.5-9.0 s)


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context."""


class GenerationCancelled(Exception):
    """`generate_ids`' `cancel` was set: the generation ended before its next round (its session is closed)."""


@dataclass(slots=True)
class _Generation:
    """One generation's state on the device."""
    session_id: str  # the cloud session
    tokens: list[int]  # prompt and every generated token, in order
    caches: DeviceCaches  # the device parts' caches
    max_positions: int  # the most positions the cloud's session will hold (prompt + token budget)
    steps: list[StepTiming] = field(default_factory=list)  # per cloud round
    recoveries: int = 0  # history re-sends so far
    admission_waits: int = 0  # times the cloud was full and the device waited before opening
    lengths: DraftLengthChooser | None = None  # speculation: per-position acceptance and the draft length choice
    guard: ParallelGuard | None = None  # speculation: whether drafting ahead slows the cloud


def encode_prompt(tokenizer, prompt: str, chat: bool | None = False) -> list[int]:
    """`prompt`'s token ids; `chat`: as the one user message of the tokenizer's chat template (None: when the
    tokenizer has one), ready for the assistant's answer."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("this model's tokenizer has no chat template: send the prompt as it is (without --chat)")
    if not (chat or (chat is None and has_template)):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote its own special tokens


class SplitGenerator:
    def __init__(self, model: DeviceModel, link: CloudLink, speculation: SpeculationConfig | None = None,
                 chunking: ChunkingConfig = DEFAULT_CHUNKING, profile: DeviceProfile | None = None):
        """`speculation`: draft with the bundle's adapter (None = plain split decoding). `chunking`: how prompts
        are cut. `profile`: this device's compute costs (None = profile the parts now, a fraction of a second)."""
        if speculation is not None and model.adapter is None:
            raise ValueError("speculation needs a device bundle with a draft adapter (`hat split --adapter`)")
        self.model, self.link, self.speculation = model, link, speculation
        self.max_context = model.spec.max_context
        self.max_message_tokens = self.max_context  # the cloud's per-message limit: longer prompts go in pieces
        registration = link.registration
        if registration is not None:
            self.max_context = min(self.max_context, registration.max_context or self.max_context)
            self.max_message_tokens = registration.max_tokens_per_message or self.max_message_tokens
        self.predicted_round_s = 0.0  # moving average of verification round times (bounds parallel drafting)
        self.round_overhead_s: float | None = None  # moving average of round time beyond the cloud's and the link's
        self._round_fit = CostFit(_ROUND_FIT_WINDOW)  # measured verification rounds: seconds against tokens
        self._round_tokens: deque[int] = deque(maxlen=_ROUND_FIT_WINDOW)  # their token counts
        self._draft_timing = [0, 0.0]  # draft steps timed so far, their seconds (the draft-step time)
        self._draft_heads: dict[int, DraftHead] = {}  # by draft vocabulary size, built once
        profile = profile or self._profile()
        self.link_estimator = LinkEstimator()  # kept across generations: the link as measured so far
        self.prefill = PrefillPipeline(model, link, chunking, profile, self.link_estimator)
        self._reprofile = threading.Event()  # set from another thread (telemetry): the device's speed changed

    @torch.inference_mode()
    def probe(self, sizes: tuple[int, ...] = PROBE_CHUNKS, whole: int = PROBE_WHOLE,
              warmups: int = PROBE_WARMUPS) -> None:
        """Scratch prompts, unrecorded, before the first real one: one cut into `sizes` (within half the context),
        then one of `whole` tokens sent whole (0: none). The link estimator learns the link, the cloud tracker how
        the cloud's published predictor holds, and the device's fits its parts over the real path, so that the
        first prompt's plan and prediction are right (a cold start would otherwise plan with a 10 MB/s, 20 ms prior
        link). The scratch prompt with the largest forward runs `warmups` times first, its timings taken by a
        throwaway pipeline."""
        kept, room = [], self.max_context // 2  # a scratch prompt takes half the context at most
        for n in sizes:
            if n <= room:
                kept.append(n)
                room -= n
        prompts = [tuple(kept) or (min(16, self.max_context - 1),)]
        whole = min(whole, self.max_context // 2, self.max_message_tokens)
        if whole > (kept[0] if kept else 0):  # the chunked prompt's first forward did not time it already
            prompts.append((whole,))
        largest = max(prompts, key=lambda cut: (max(cut), -len(cut)))
        if warmups:
            warmup = PrefillPipeline(self.model, self.link, self.prefill.config, copy.deepcopy(self.prefill.profile),
                                     LinkEstimator())
            for _ in range(warmups):
                self._scratch_prompt(largest, warmup)
        for cut in prompts:
            self._scratch_prompt(cut, self.prefill)

    def _scratch_prompt(self, sizes: tuple[int, ...], prefill: PrefillPipeline) -> None:
        """Prefill a scratch prompt of random tokens cut into `sizes` through `prefill`, one chunk in flight at a
        time (every timing solo), and close its session."""
        total = sum(sizes)
        vocab = min(self.model.spec.vocab_size, 1000)
        ids = torch.randint(vocab, (total,), generator=torch.Generator().manual_seed(0)).tolist()
        model = self.model
        caches = DeviceCaches(model.input_part.new_cache(), model.output_part.new_cache(),
                              model.adapter.new_cache() if self.speculation else None)
        session, config = secrets.token_hex(6), prefill.config
        prefill.config = dataclasses.replace(config, max_in_flight=1)  # one at a time: every timing solo
        try:
            prefill.run(session, ids, caches, self.max_message_tokens, [], self.link.send_open(session, total + 1),
                        sizes=sizes)
        finally:
            prefill.config = config
            self._close_quietly(session)

    def _profile(self) -> DeviceProfile:
        """Time this device's parts now (a fraction of a second)."""
        return DeviceProfile().profile(self.model, with_adapter=self.speculation is not None)

    def request_reprofile(self) -> None:
        """The device's compute speed changed (a power-mode change): profile its parts afresh before the next
        generation, so the chunk planner plans with the new speed. Safe to call from any thread."""
        self._reprofile.set()

    def encode(self, prompt: str, chat: bool | None = False) -> list[int]:
        return encode_prompt(self.model.tokenizer, prompt, chat)

    def generate(self, prompt: str, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 on_text: Callable[[str], None] | None = None, chat: bool | None = False) -> GenerationResult:
        started = time.perf_counter()
        return self.generate_ids(self.encode(prompt, chat), max_new_tokens, sampling, on_text, started)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                     on_text: Callable[[str], None] | None = None, started: float | None = None,
                     cancel: threading.Event | None = None) -> GenerationResult:
        """`cancel`, set from another thread, ends the generation before its next round (GenerationCancelled)."""
        started = time.perf_counter() if started is None else started
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(prompt_ids) >= self.max_context:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                                     f"{self.max_context} tokens, which leaves no room to generate")
        if self._reprofile.is_set():
            self._reprofile.clear()
            self.prefill.profile = self._profile()
            self.predicted_round_s = 0.0
        budget = min(max_new_tokens, self.max_context - len(prompt_ids))
        up0, down0 = self.link.bytes_up, self.link.bytes_down
        rng = sampling.make_generator()
        stream = TextStream(self.model.tokenizer, on_text)
        model = self.model
        caches = DeviceCaches(model.input_part.new_cache(), model.output_part.new_cache(),
                              model.adapter.new_cache() if self.speculation else None)
        # 48 random bits: ids stay short on the wire
        g = _Generation(secrets.token_hex(6), list(prompt_ids), caches, len(prompt_ids) + budget)
        generated: list[int] = []
        token_times: list[float] = []
        finish = "length"

        def emit(tokens: list[int]) -> bool:
            """Append tokens in order; True once the generation is over (stop token or budget)."""
            nonlocal finish
            for token in tokens:
                generated.append(token)
                token_times.append(time.perf_counter())
                if token in model.stop_ids:
                    finish = "stop"
                    return True
                if len(generated) == budget:
                    return True
            return False

        try:
            prefill_began = time.perf_counter()
            logits, prefill = self._prefill(g)
            pending = sample_token(logits, sampling, rng)
            done = emit([pending])
            drafter = Drafter(model, caches, self.speculation, sampling, torch.Generator().manual_seed(
                int(torch.randint(2 ** 62, (1,), generator=rng))), self.draft_head()) if self.speculation else None
            if drafter is not None:
                g.lengths, g.guard = DraftLengthChooser(self.speculation.max_draft), ParallelGuard()
                drafter.verified = prefill.last_middle  # a conditioned adapter's first feature
            carried: Draft | None = None
            while not done:
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled
                if on_text is not None:
                    stream.update(generated)
                if drafter is None:
                    g.tokens.append(pending)
                    logits = self._decode_step(g, pending)
                    pending = sample_token(logits, sampling, rng)
                    done = emit([pending])
                else:
                    new, carried = self._speculative_round(g, drafter, pending, carried, budget - len(generated),
                                                           sampling, rng)
                    g.tokens.extend([pending] + new[:-1])
                    pending = new[-1]
                    done = emit(new)
                    if carried is None and g.lengths.gave_up():  # measured not to pay: plain rounds from here on
                        drafter = None
            stream.update(generated, final=True)
        finally:
            self._close_quietly(g.session_id)
        return GenerationResult(
            token_ids=generated, text=stream.emitted, prompt_tokens=len(prompt_ids), finish_reason=finish,
            ttft_ms=(token_times[0] - started) * 1000,
            tbt_ms=[(b - a) * 1000 for a, b in zip(token_times, token_times[1:])],
            bytes_up=self.link.bytes_up - up0, bytes_down=self.link.bytes_down - down0,
            speculative=self.speculation is not None, recoveries=g.recoveries, steps=g.steps,
            chunking=self.prefill.config.mode, chunks=prefill.chunks,
            ttft_predicted_ms=(prefill_began - started + prefill.predicted_s) * 1000, replans=prefill.replans,
            plan_ms=prefill.plan_ms, admission_waits=g.admission_waits)

    def _prefill(self, g: _Generation) -> tuple[torch.Tensor, PrefillReport]:
        """Open the session and run the prompt through the pipelined prefill (the first chunk goes out without
        waiting for the OPENED reply: the cloud takes a connection's messages in order); the logits of the last
        position. If the cloud loses the session meanwhile, the session is re-opened and the prefill starts over."""
        deadline = time.monotonic() + self.link.config.admission_timeout_s
        while True:
            try:
                middle, report = self.prefill.run(g.session_id, g.tokens, g.caches, self.max_message_tokens, g.steps,
                                                  self.link.send_open(g.session_id, g.max_positions))
                break
            except CloudError as exc:
                if self._wait_for_admission(g, exc, deadline):
                    continue
                self._recover(g, exc)
        output = self.model.output_part
        return output.logits(middle.to(output.dtype))[0], report

    def _wait_for_admission(self, g: _Generation, exc: CloudError, deadline: float) -> bool:
        """On OVERLOADED with a retry hint, wait as the cloud says and return True (the caller retries); raise once
        the wait would pass `deadline`; False for any other error."""
        if exc.code != pb.OVERLOADED or not exc.retry_after_s:
            return False
        if time.monotonic() + exc.retry_after_s > deadline:
            raise CloudError(f"{exc} (still refused after waiting {self.link.config.admission_timeout_s:g} s)",
                             exc.code) from None
        time.sleep(exc.retry_after_s)
        g.admission_waits += 1
        return True

    def _open(self, g: _Generation) -> None:
        """Open the session and wait for it, waiting for admission as the cloud says when it is full."""
        deadline = time.monotonic() + self.link.config.admission_timeout_s
        while True:
            try:
                self.link.open_session(g.session_id, g.max_positions)
                return
            except CloudError as exc:
                if not self._wait_for_admission(g, exc, deadline):
                    raise

    def draft_head(self) -> DraftHead:
        """The draft's LM head for the speculation settings (reduced heads are gathered once and kept)."""
        size = self.speculation.draft_vocab
        if size not in self._draft_heads:
            self._draft_heads[size] = reduced_head(self.model, size)
        return self._draft_heads[size]

    @property
    def draft_step_s(self) -> float | None:
        """Measured time of one draft step (draft head, then the input part and adapter over its token)."""
        steps, seconds = self._draft_timing
        return seconds / steps if steps else None

    def _variable_round_s(self, tokens: int, start: int) -> float:
        """The part of a verification round over `tokens` positions that grows with them: the cloud's middle part
        (its published cost model, scaled by what replies measured), the link's transfer both ways (measured rates),
        and the device's output part over the verified positions (its profile)."""
        cloud, _ = self.prefill.cloud.cost()
        link = self.link_estimator.estimate
        size = tokens * self.model.spec.hidden_size * self.model.input_part.dtype.itemsize
        return (cloud.predict(tokens, start) + self.prefill.profile.output.cost.predict(tokens, start)
                + size / link.uplink_bytes_per_s + size / link.downlink_bytes_per_s)

    def round_time_s(self, tokens: int, start: int) -> float:
        """Predicted time of a verification round over `tokens` positions from `start`, send to verdict: a fit of
        the measured rounds once they span several token counts, before that the measured overhead plus the
        variable part's models."""
        if len(set(self._round_tokens)) >= 2:
            return max(_MIN_ROUND_S, self._round_fit.cost.predict(tokens, start))
        return max(_MIN_ROUND_S, (self.round_overhead_s or 0.0) + self._variable_round_s(tokens, start))

    def _decode_step(self, g: _Generation, token: int) -> torch.Tensor:
        """One plain decode round: `token` (the last of g.tokens) through all three parts; its logits."""
        model, caches = self.model, g.caches
        position = len(g.tokens) - 1
        began = time.perf_counter()
        hidden, _ = model.run_input([token], position, caches.input)
        sent = time.perf_counter()
        needs_all = model.output_part.num_layers > 0
        reply = self._forward(g, position, hidden, return_last=0 if needs_all else 1)
        round_ms = (time.perf_counter() - sent) * 1000
        middle = reply.tensor
        if needs_all:
            middle = model.output_part.forward_layers(middle, [SequenceSpan(caches.output, position, 1)])
        step_ms = (time.perf_counter() - began) * 1000
        g.steps.append(StepTiming(1, step_ms - round_ms, round_ms, reply.header.compute_us / 1000, True, sent_s=sent,
                                  in_cloud_ms=in_cloud_ms(reply.header),
                                  batch_sessions=reply.header.batch_sessions))
        return model.output_part.logits(middle[-1:].to(model.output_part.dtype))[0]

    def _speculative_round(self, g: _Generation, drafter: Drafter, pending: int, carried: Draft | None,
                           remaining: int, sampling: SamplingParams, rng: torch.Generator) -> tuple[list[int], Draft | None]:
        """Draft from `pending` (its position is len(g.tokens)), verify in one cloud round; returns the new tokens
        (accepted drafts, then the corrected or bonus token) and the next round's draft if one was made ahead."""
        model, caches = self.model, g.caches
        start = len(g.tokens)
        limit = max(0, min(self.speculation.max_draft, remaining - 1, self.max_context - start - 1,
                           self.max_message_tokens - 1))
        free = len(carried.drafted) if carried else 0
        if self.speculation.length == "cost":
            limit = g.lengths.choose(self.draft_step_s, lambda tokens: self.round_time_s(tokens, start), limit, free)
        began = time.perf_counter()
        steps0, step_s0 = drafter.steps, drafter.step_s
        draft = drafter.extend(carried or drafter.new_draft(start, pending), limit)
        self._draft_timing[0] += drafter.steps - steps0
        self._draft_timing[1] += drafter.step_s - step_s0
        if len(draft.drafted) > limit:  # a carried draft longer than this round may verify
            caches.truncate(start + limit + 1)
            draft = Draft(start, draft.tokens[:limit + 1], draft.probs[:limit], draft.hiddens[:limit + 1],
                          draft.estimates[:limit + 1], previous=draft.previous)
        sent = time.perf_counter()
        n = len(draft.drafted)
        hidden = torch.cat(draft.hiddens[:n + 1])
        sequence = self.link.send_forward(g.session_id, start, hidden)
        ahead = None
        if self.speculation.parallel and remaining > n + 2 and g.lengths.predraft_pays(n) and g.guard.allow():
            deadline = sent + self.predicted_round_s
            ahead = drafter.predraft(draft, lambda: not self.link.reply_ready() and time.perf_counter() < deadline)
        reply = self._receive(g, sequence, start, hidden)
        received = time.perf_counter()
        round_s = received - sent
        self.predicted_round_s = round_s if not self.predicted_round_s else (
            _ROUND_EMA * round_s + (1 - _ROUND_EMA) * self.predicted_round_s)
        output = model.output_part
        verified = output.forward_layers(reply.tensor, [SequenceSpan(caches.output, start, n + 1)])
        target_logits = output.logits(verified.to(output.dtype))
        verified_at = time.perf_counter()
        if draft.probs:
            probs = torch.stack(draft.probs)
        else:  # greedy, or an empty draft
            probs = None if sampling.greedy else target_logits.new_zeros(0, target_logits.shape[1])
        verdict = verify(draft.drafted, probs, target_logits, sampling, rng)
        accepted = verdict.accepted
        new = draft.drafted[:accepted] + [verdict.next_token]
        g.lengths.observe(n, accepted, verdict.next_token == ahead.tokens[0] if ahead and accepted == n else None)
        compute_s = reply.header.compute_us / 1e6
        g.guard.observe(ahead is not None, compute_s, self.prefill.cloud.cost()[0].predict(n + 1, start))
        measured = round_s + (verified_at - received)
        self._round_fit.add(n + 1, attended(n + 1, start), measured)
        self._round_tokens.append(n + 1)
        overhead = measured - self._variable_round_s(n + 1, start)
        self.round_overhead_s = overhead if self.round_overhead_s is None else (
            _ROUND_EMA * overhead + (1 - _ROUND_EMA) * self.round_overhead_s)
        keep_ahead = ahead is not None and accepted == n and verdict.next_token == ahead.tokens[0]
        if not keep_ahead:
            caches.truncate(start + accepted + 1)
        drafter.settle(draft, accepted, reply.tensor, rewrite=not keep_ahead)
        g.steps.append(StepTiming(
            tokens=n + 1, device_ms=(time.perf_counter() - received) * 1000, round_ms=round_s * 1000,
            cloud_compute_ms=reply.header.compute_us / 1000, decode=True, drafted=n, accepted=accepted,
            draft_ms=(sent - began) * 1000, predrafted=len(ahead.tokens) if ahead else 0,
            predraft_reused=len(ahead.tokens) if keep_ahead else 0, sent_s=sent, in_cloud_ms=in_cloud_ms(reply.header),
            batch_sessions=reply.header.batch_sessions))
        return new, ahead if keep_ahead else None

    def _forward(self, g: _Generation, start: int, hidden: torch.Tensor, return_last: int = 0):
        return self._receive(g, self.link.send_forward(g.session_id, start, hidden, return_last), start, hidden,
                             return_last)

    def _receive(self, g: _Generation, sequence: int, start: int, hidden: torch.Tensor, return_last: int = 0):
        """The reply to `sequence`; if the cloud lost the session (or stopped answering, or restarted), re-send the
        history before `start` and retry, as often as _recover allows."""
        try:
            return self.link.receive(sequence)
        except CloudError as exc:
            failure = exc
        while True:
            self._recover(g, failure)
            try:
                self._resend_history(g, start)
                return self.link.forward(g.session_id, start, hidden, return_last)
            except CloudError as exc:
                failure = exc

    def _recover(self, g: _Generation, exc: CloudError) -> None:
        """Get ready to re-send the history after `exc`, or raise. A lost session needs nothing more; a cloud that
        did not answer (CloudTimeoutError) or forgot this device (NOT_REGISTERED: it restarted) is registered with
        again, retried with growing waits until LinkConfig.recovery_timeout_s has passed."""
        lost_cloud = isinstance(exc, CloudTimeoutError) or exc.code == pb.NOT_REGISTERED
        if not lost_cloud and exc.code not in RECOVERABLE:
            raise exc
        if g.recoveries >= MAX_RECOVERIES:
            raise CloudError(f"gave up after {g.recoveries} recoveries in this generation: {exc}", exc.code) from None
        g.recoveries += 1
        if not lost_cloud:
            return
        bound = self.link.config.recovery_timeout_s
        deadline, wait = time.monotonic() + bound, RETRY_BACKOFF_S[0]
        while True:
            log.warning("the cloud stopped answering (%s); registering again in %.1f s", exc, wait)
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            try:
                self.link.register_again()
                return
            except CloudError as again:
                exc = again
            if time.monotonic() >= deadline:
                raise CloudError(f"the cloud has not answered for {bound:g} s (recovery_timeout_s): {exc}") from None
            wait = min(2 * wait, RETRY_BACKOFF_S[1])

    def _resend_history(self, g: _Generation, end: int) -> None:
        """Open the session afresh and rebuild its cloud cache from positions [0, end) of the device's own tokens,
        sent as prompt chunks (a disaggregated cloud re-prefills them on a prefill worker). The input part runs into
        a scratch cache, so the device's caches (drafts included) are untouched."""
        self._open(g)
        scratch = self.model.input_part.new_cache()
        for start in range(0, end, self.max_message_tokens):
            hidden, _ = self.model.run_input(g.tokens[start:min(end, start + self.max_message_tokens)], start, scratch)
            self.link.receive(self.link.send_forward(g.session_id, start, hidden, return_last=1, append_only=True))

    def _close_quietly(self, session_id: str) -> None:
        try:
            self.link_estimator.on_close(self.link.close_session(session_id))
        except (CloudError, wire.WireError, zmq.ZMQError) as exc:  # the cloud may be gone: its idle expiry frees the
            log.debug("session %s not closed: %s", session_id, exc)  # session then (a programming error still raises)
