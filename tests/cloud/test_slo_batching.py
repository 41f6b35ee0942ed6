"""SLO-aware batch composition: a prompt chunk joins a batch with decode rounds only while the latency predictor
says the forward stays within those sessions' time-between-rounds target."""
from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import torch

from hat.cloud.middle_worker import ForwardJob
from hat.cloud.scheduler import form_batch, predicted_s
from hat.common.cost_fit import LinearCost
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import make_header

COST = LinearCost(base_s=0.005, per_token_s=0.0002, per_attended_s=0.0)  # 5 ms + 0.2 ms per token


def job(session: str, tokens: int, chunk: bool, tbt_slo_s: float = 0.0, start: int = 0) -> ForwardJob:
    header = make_header(pb.FORWARD, session, start=start, num_tokens=tokens, append_only=chunk)
    return ForwardJob(b"o", header, torch.zeros(tokens, 4), SimpleNamespace(tbt_slo_s=tbt_slo_s))


def test_a_chunk_that_would_break_a_decode_target_waits():
    """Decode round of a session with a 50 ms target, then a 512-token chunk (predicted 5 + 0.2 * 513 ms): the
    chunk waits; a 64-token chunk (about 18 ms) joins."""
    decode = job("d", 1, chunk=False, tbt_slo_s=0.050)
    big, small = job("p1", 512, chunk=True), job("p2", 64, chunk=True)
    batch, rest = form_batch(deque([decode, big, small]), 8192, COST)
    assert batch == [decode, small] and list(rest) == [big]
    assert predicted_s(COST, [decode, big]) > 0.050 >= predicted_s(COST, batch)


def test_without_decode_rounds_chunks_fill_the_token_budget():
    """No decode round in the batch: no target applies and chunks go in up to the token budget."""
    chunks = [job(f"p{i}", 512, chunk=True) for i in range(3)]
    batch, rest = form_batch(deque(chunks), 1024, COST)
    assert batch == chunks[:2] and list(rest) == chunks[2:]


def test_the_oldest_job_goes_in_even_past_a_target():
    """The oldest pending job is always admitted (nothing starves), even a chunk that a target would hold back."""
    big, decode = job("p", 512, chunk=True), job("d", 1, chunk=False, tbt_slo_s=0.010)
    batch, rest = form_batch(deque([big, decode]), 8192, COST)
    assert batch == [big, decode] and not rest


def test_the_tightest_target_of_the_batch_decides():
    """Two decode sessions, targets 500 ms and 20 ms: a 100-token chunk (about 26 ms) is held back by the 20 ms one."""
    loose, tight = job("a", 1, chunk=False, tbt_slo_s=0.5), job("b", 1, chunk=False, tbt_slo_s=0.020)
    chunk = job("p", 100, chunk=True)
    batch, rest = form_batch(deque([loose, tight, chunk]), 8192, COST)
    assert batch == [loose, tight] and list(rest) == [chunk]
    batch, _ = form_batch(deque([loose, chunk]), 8192, COST)
    assert batch == [loose, chunk]


def test_no_predictor_means_no_slo_check():
    """Without a cost model the batch is formed on the token budget alone."""
    decode, big = job("d", 1, chunk=False, tbt_slo_s=0.001), job("p", 512, chunk=True)
    batch, _ = form_batch(deque([decode, big]), 8192, None)
    assert batch == [decode, big]
