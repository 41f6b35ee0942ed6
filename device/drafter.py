"""Drafting on the device: input part -> adapter -> output part, one token at a time, on the device's caches.

The input part's hidden states of drafted tokens are exactly what the cloud needs to verify them, so
a draft costs the device nothing extra on the uplink side. Caches at a position p >= the round's
start hold draft values until verification: the input part's and the adapter's are exact for the
tokens drafted (they depend on the tokens only), the output part's hold adapter estimates and are
overwritten by the verification pass; every cache is cut back to the accepted length afterwards.

A verified-conditioned adapter (AdapterConfig.conditioning) also takes the middle output of the position before
each token. The drafter keeps the cloud's (verified) middle output of the last verified position: a round's first
token (the pending one) is run with it, each later draft token with the adapter's own estimate of the token before.
So its cache entries of drafted positions depend on those estimates: after a verification `settle` rewrites the
accepted positions' entries from the verified middle outputs (as the adapter was trained: teacher-forced), unless a
draft made ahead is kept (its entries stand, estimates and all; drafts only propose, verification decides).
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
    # a conditioned adapter's middle output of the position before tokens[0], [1, width]: the cloud's (verified) one
    # for a round's own draft, the adapter's estimate for a draft made ahead; None for an input-only adapter
    previous: torch.Tensor | None = None
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
        self.conditioned = model.conditioned_adapter  # the adapter takes the previous position's middle output
        # conditioned: the cloud's middle output of the last verified position [1, width] (set after the prefill,
        # then by settle); the feature of the next round's first token
        self.verified: torch.Tensor | None = None

    def new_draft(self, start: int, pending: int) -> Draft:
        """A round's draft from its pending token at `start` (conditioned: fed the verified middle output before it)."""
        if self.conditioned and self.verified is None:
            raise ValueError("a verified-conditioned adapter drafts after the cloud's middle output of the position "
                             "before: set Drafter.verified after the prefill")
        return Draft(start, [pending], previous=self.verified if self.conditioned else None)

    def settle(self, draft: Draft, accepted: int, middle: torch.Tensor, rewrite: bool) -> None:
        """After verifying `draft` (the cloud's middle outputs `middle` of its positions, [len(tokens), width]) with
        `accepted` drafted tokens accepted: keep the verified middle output of the last accepted position for the
        next round and, with `rewrite` (the caches were cut back to the accepted length), rewrite a conditioned
        adapter's cache entries of the accepted positions from the verified middle outputs before them."""
        if not self.conditioned:
            return
        if rewrite:
            # tokens[0]'s entry is exact already when it was run with the verified output (a round's own draft)
            first = 1 if draft.previous is self.verified else 0
            if first <= accepted:
                features = torch.cat([self.verified, middle[:accepted]])[first:]
                self.model.run_adapter(draft.tokens[first:accepted + 1], torch.cat(draft.hiddens[first:accepted + 1]),
                                       draft.start + first, self.caches.adapter, features)
        self.verified = middle[accepted:accepted + 1]

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
        ahead = Draft(start=position, tokens=[guess], previous=draft.estimates[-1] if self.conditioned else None)
        return self.extend(ahead, min(self.config.max_predraft - 1, room), keep_going)

    def _run_input(self, draft: Draft) -> None:
        """Input part and adapter over the next token that has not been run (one position)."""
        i = len(draft.hiddens)
        previous = None
        if self.conditioned:  # the verified (or, ahead, estimated) output before the draft, then its own estimates
            previous = draft.previous if i == 0 else draft.estimates[i - 1]
            if previous is None:
                raise ValueError("a verified-conditioned adapter's draft needs the middle output before its first token")
        hidden, estimate = self.model.run_input(draft.tokens[i:i + 1], draft.start + i, self.caches.input,
                                                self.caches.adapter, previous)
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
