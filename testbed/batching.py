"""Batching gain of the cloud's middle part: tokens per second of decode or verification rounds when the
rounds of B sessions run in one forward (the cloud's own ragged MiddleWorker.run), against one session."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class BatchingRow:
    sessions: int  # sessions per forward
    seconds: float  # median time of one forward
    tokens_per_s: float  # middle-part tokens per second
    gain: float  # tokens_per_s / that of one session


def measure_batching(cloud_dir: str | Path, device: str = "cpu", batches: tuple[int, ...] = (1, 2, 4, 8, 16),
                     context_tokens: int = 256, round_tokens: int = 1, rounds: int = 20) -> list[BatchingRow]:
    """Each session holds `context_tokens` positions; every forward appends `round_tokens` to each of B sessions and
    is cut back after, so the context stays fixed. Median of `rounds` forwards per batch size, after 3 warm-ups."""
    from hat.cloud.kv_budget import KVBudget
    from hat.cloud.middle_worker import ForwardJob, MiddleWorker, load_middle_part
    from hat.cloud.session_store import SessionStore
    from hat.common.proto import hat_pb2 as pb
    from hat.common.wire import make_header

    part, _ = load_middle_part(cloud_dir, device)
    worker = MiddleWorker(part)
    store = SessionStore(part, max(batches), 3600, KVBudget(part.kv_bytes_per_position, 1 << 40))
    sessions = [store.open(f"s{i}", "bench", b"bench", context_tokens + round_tokens) for i in range(max(batches))]
    generator = torch.Generator().manual_seed(0)
    hidden_size = part.spec.hidden_size
    for i, session in enumerate(sessions):  # fill each cache with a prompt
        hidden = torch.randn(context_tokens, hidden_size, generator=generator).to(part.dtype)
        worker.run([ForwardJob(b"bench", make_header(pb.FORWARD, f"s{i}", start=0), hidden, session)])
    inputs = [torch.randn(round_tokens, hidden_size, generator=generator).to(part.dtype) for _ in sessions]

    def forward(size: int) -> float:
        jobs = [ForwardJob(b"bench", make_header(pb.FORWARD, f"s{i}", start=context_tokens, return_last=1),
                           inputs[i], sessions[i]) for i in range(size)]
        began = time.perf_counter()
        worker.run(jobs)
        if part.device.type == "cuda":
            torch.cuda.synchronize(part.device)
        return time.perf_counter() - began

    rows: list[BatchingRow] = []
    for size in batches:
        for _ in range(3):
            forward(size)
        seconds = statistics.median(forward(size) for _ in range(rounds))
        rate = size * round_tokens / seconds
        rows.append(BatchingRow(size, seconds, rate, rate / rows[0].tokens_per_s if rows else 1.0))
    return rows
