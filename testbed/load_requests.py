"""Emulated devices for cloud load experiments: a Poisson stream of requests, each replayed at the data plane.

An emulated device does what a real one does on the wire, without a model: it registers, opens a
session with its SLO targets, streams its prompt as pipelined append-only chunks of random hidden
states, then runs verification rounds (`round_tokens` positions each, `accepted` kept, the rest rolled
back by the next round's start), each after `device_round_s` of emulated device compute, and closes.
A refused OPEN (OVERLOADED) waits as the cloud says. Its time to first token is OPEN to the last
chunk's reply; its time between rounds, the interval between consecutive round replies.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from hat.common.bundle import BundleManifest
from hat.common.proto import hat_pb2 as pb
from hat.device.cloud_link import CloudError, CloudLink, LinkConfig


@dataclass(frozen=True, slots=True)
class RequestShape:
    arrival_s: float  # when the device arrives, from the start of the run
    prompt_tokens: int  # prompt positions to prefill
    rounds: int  # verification rounds after the prompt
    round_tokens: int = 4  # positions sent per round (a draft of round_tokens - 1 and the pending token)
    accepted: int = 3  # positions each round keeps (the next round starts after them)
    chunk_tokens: int = 128  # prompt chunk size
    device_round_s: float = 0.005  # emulated device compute between rounds (drafting and verifying)


@dataclass(slots=True)
class RequestRecord:
    shape: RequestShape
    ttft_s: float = 0.0  # OPEN sent to the last prompt chunk's reply
    round_intervals_s: list[float] = field(default_factory=list)  # between consecutive round replies
    finished_s: float = 0.0  # when it closed, from the start of the run
    admission_waits: int = 0  # OVERLOADED refusals waited out
    error: str = ""  # why it failed, if it did

    @property
    def mean_tbt_s(self) -> float:
        return statistics.fmean(self.round_intervals_s) if self.round_intervals_s else 0.0

    def meets(self, ttft_slo_s: float, tbt_slo_s: float) -> bool:
        """Both targets met: TTFT, and the mean time between rounds (as DistServe's TPOT)."""
        return not self.error and self.ttft_s <= ttft_slo_s and self.mean_tbt_s <= tbt_slo_s


def poisson_workload(count: int, rate_per_s: float, seed: int = 0, prompt_tokens: tuple[int, int] = (64, 512),
                     rounds: tuple[int, int] = (8, 24), **shape) -> list[RequestShape]:
    """`count` requests arriving as a Poisson process of `rate_per_s`; prompt lengths and round counts uniform in
    the given inclusive ranges; the same seed gives the same workload."""
    rng = random.Random(seed)
    arrival, out = 0.0, []
    for _ in range(count):
        arrival += rng.expovariate(rate_per_s)
        out.append(RequestShape(arrival, rng.randint(*prompt_tokens), rng.randint(*rounds), **shape))
    return out


def run_request(config: LinkConfig, manifest: BundleManifest, hidden_size: int, shape: RequestShape, session_id: str,
                started: float, admission_timeout_s: float = 60.0) -> RequestRecord:
    """Replay one request against the cloud at `config` (blocking); never raises: failures go in `error`."""
    record = RequestRecord(shape)
    generator = torch.Generator().manual_seed(hash(session_id) % (1 << 31))
    prompt = torch.randn(shape.prompt_tokens, hidden_size, generator=generator)
    round_hidden = torch.randn(shape.round_tokens, hidden_size, generator=generator)
    positions = shape.prompt_tokens + shape.rounds * shape.accepted + shape.round_tokens
    try:
        with CloudLink(config) as link:
            link.register(manifest)
            deadline = time.monotonic() + admission_timeout_s
            began = time.perf_counter()
            while True:
                sequences = [link.send_open(session_id, positions)]
                for start in range(0, shape.prompt_tokens, shape.chunk_tokens):
                    chunk = prompt[start:start + shape.chunk_tokens]
                    sequences.append(link.send_forward(session_id, start, chunk, return_last=1, append_only=True))
                try:
                    for sequence in sequences:
                        link.receive(sequence)
                    break
                except CloudError as exc:
                    for sequence in sequences:
                        link.forget(sequence)
                    if exc.code != pb.OVERLOADED or not exc.retry_after_s or time.monotonic() > deadline:
                        raise
                    record.admission_waits += 1
                    time.sleep(exc.retry_after_s)
            last = time.perf_counter()
            record.ttft_s = last - began
            position = shape.prompt_tokens
            for _ in range(shape.rounds):
                time.sleep(shape.device_round_s)
                link.forward(session_id, position, round_hidden)
                now = time.perf_counter()
                record.round_intervals_s.append(now - last)
                last = now
                position += shape.accepted
            link.close_session(session_id)
    except CloudError as exc:
        record.error = str(exc)
    record.finished_s = time.perf_counter() - started
    return record
