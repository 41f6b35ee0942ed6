"""Drafting on the device: input part -> adapter -> output part, one token at a time, on the device's caches.

The input part's hidden states of drafted tokens are exactly what the cloud needs to verify them, so
a draft costs the device nothing extra on the uplink side. Caches at a position p >= the round's
start hold draft values until verification: the input part's and the adapter's are exact for the
tokens drafted (they depend on the tokens only), the output part's hold adapter estimates and are
overwritten by the verification pass; every cache is cut back to the accepted length afterwards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hat.common.layers import SequenceSpan
from hat.common.sampling import SamplingParams, token_distribution

from .device_model import DeviceModel
from .draft_head import DraftHead
from .speculation import SpeculationConfig


@dataclass(slots=True)
class DeviceCaches:
    """One generation's caches on the device."""
    input: object  # KVCache of the input part
    output: object  # KVCache of the output part
    adapter: object | None = None  # KVCache of the adapter (speculation only)

    def truncate(self, length: int) -> None:
        for cache in (self.input, self.output, self.adapter):
            if cache is not None:
                cache.truncate(min(length, cache.length))


@dataclass(slots=True)
class Draft:
    """Tokens from `start` on: tokens[0] is the round's pending (already chosen) token, the rest are drafted."""
    start: int  # absolute position of tokens[0]
    tokens: list[int]  # pending token, then drafted tokens
    probs: list[torch.Tensor] = field(default_factory=list)  # sampling: q of tokens[i + 1]; empty when greedy
    hiddens: list[torch.Tensor] = field(default_factory=list)  # input-part output of tokens[i], [1, width] each
    estimates: list[torch.Tensor] = field(default_factory=list)  # adapter output of tokens[i], [1, width] each
    confident: bool = True  # the last drafting step cleared the threshold (False: drafting stopped on it)

    @property
    def drafted(self) -> list[int]:
        return self.tokens[1:]


class Drafter:
    def __init__(self, model: DeviceModel, caches: DeviceCaches, config: SpeculationConfig, sampling: SamplingParams,
                 generator: torch.Generator, head: DraftHead | None = None):
        """`head`: the draft's LM head (None: the output part's full head)."""
        if model.adapter is None:
            raise ValueError("the device bundle has no draft adapter: `hat split --adapter DIR`, or run without speculation")
        self.model, self.caches, self.config, self.sampling, self.generator = model, caches, config, sampling, generator
        self.head = head or DraftHead(model.output_part)
        self.steps, self.step_s = 0, 0.0  # draft-head steps taken and their time (each: head, then the next input)

    def extend(self, draft: Draft, limit: int, keep_going: Callable[[], bool] = lambda: True) -> Draft:
        """Draft until `limit` drafted tokens, a step under the threshold, or keep_going() turns False; every
        token of the draft has its input-part hidden state on return."""
        self._rebuild_output_cache(draft)
        by_threshold = self.config.length == "threshold"
        began = None
        while True:
            if len(draft.hiddens) < len(draft.tokens):
                self._run_input(draft)
            if began is not None:
                self.steps, self.step_s = self.steps + 1, self.step_s + time.perf_counter() - began
            if len(draft.drafted) >= limit or not keep_going():
                return draft
            began = time.perf_counter()
            logits = self._run_draft_head(draft)
            token, probs, confidence = self._choose(logits)
            draft.confident = not by_threshold or confidence >= self.config.threshold
            if not draft.confident:
                return draft
            draft.tokens.append(token)
            if probs is not None:
                draft.probs.append(probs)

    def predraft(self, draft: Draft, keep_going: Callable[[], bool]) -> Draft | None:
        """While `draft` is being verified: guess the bonus token (the draft's top choice after the last drafted
        token) and draft on from it. Returns the next round's draft if every drafted token is accepted and the
        bonus equals the guess, or None when there was no time or room."""
        if self.config.max_predraft == 0 or not keep_going():
            return None
        position = draft.start + len(draft.tokens)  # where the bonus token will stand
        room = self.caches.input.max_length - position - 1  # drafted tokens that still fit the context
        if room < 0:
            return None
        guess = self.head.token_id(int(self._run_draft_head(draft).argmax()))
        ahead = Draft(start=position, tokens=[guess])
        return self.extend(ahead, min(self.config.max_predraft - 1, room), keep_going)

    def _run_input(self, draft: Draft) -> None:
        """Input part and adapter over the next token that has not been run (one position)."""
        i = len(draft.hiddens)
        hidden, estimate = self.model.run_input(draft.tokens[i:i + 1], draft.start + i, self.caches.input,
                                                self.caches.adapter)
        draft.hiddens.append(hidden)
        draft.estimates.append(estimate)

    def _run_draft_head(self, draft: Draft) -> torch.Tensor:
        """Output part over the last token's adapter estimate: the draft head's logits for the position after it
        (over the head's tokens: index i stands for self.head.token_id(i))."""
        i = len(draft.estimates) - 1
        part = self.model.output_part
        hidden = part.forward_layers(draft.estimates[i], [SequenceSpan(self.caches.output, draft.start + i, 1)])
        return self.head.logits(hidden)[0]

    def _rebuild_output_cache(self, draft: Draft) -> None:
        """A carried draft's output-cache entries were overwritten by the verification of the round before it:
        rewrite them from its adapter estimates (all but the last, which the next head step writes)."""
        carried = len(draft.estimates) - 1
        if carried > 0:
            self.model.output_part.forward_layers(torch.cat(draft.estimates[:carried]),
                                                  [SequenceSpan(self.caches.output, draft.start, carried)])

    def _choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, float]:
        """(draft token, its distribution q over the full vocabulary when sampling (zero outside a reduced head's
        tokens), the draft's confidence: the top probability of its logits at the adapter's fitted confidence
        temperature)."""
        logits = logits.float()
        confidence = float(torch.softmax(logits / self.model.adapter.config.confidence_temperature, dim=-1).max())
        if self.sampling.greedy:
            return self.head.token_id(int(logits.argmax())), None, confidence
        probs = token_distribution(logits, self.sampling)
        index = int(torch.multinomial(probs, 1, generator=self.generator))
        return self.head.token_id(index), self.head.full_probs(probs, self.model.spec.vocab_size), confidence
