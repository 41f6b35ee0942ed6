"""The cloud's batch scheduler (`form_batch`) on fake FORWARDs: no model, no sockets.

Only each session's oldest pending FORWARD is eligible; the oldest eligible one always goes in; then
decode rounds (append_only False) before prompt chunks (append_only True), oldest first, while the batch
stays within the token budget; what is left stays pending in its order. Without a latency predictor
(`cost` None, as here) no SLO check applies: the token budget alone bounds a batch.
"""
from __future__ import annotations

from collections import deque

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hat.cloud.middle_worker import ForwardJob
from hat.cloud.scheduler import form_batch
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import make_header

_sequence = iter(range(1, 1 << 30))


def job(session: str, tokens: int, chunk: bool = False) -> ForwardJob:
    """A FORWARD of `tokens` positions for `session`: a prompt chunk (append_only) or a decode round."""
    header = make_header(pb.FORWARD, session, next(_sequence), num_tokens=tokens, append_only=chunk)
    return ForwardJob(b"owner-" + session.encode(), header, torch.zeros(tokens, 1), session=None)


def names(jobs) -> list[tuple[str, int]]:
    return [(j.header.session_id, j.header.sequence) for j in jobs]


def test_empty_queue_gives_an_empty_batch():
    """Nothing pending: an empty batch and an empty queue."""
    chosen, rest = form_batch(deque(), 100)
    assert chosen == [] and list(rest) == []


def test_only_the_oldest_job_of_each_session_is_taken():
    """Several FORWARDs of one session never share a batch: only the oldest of each session goes in."""
    a1, a2, b1, a3, b2 = job("a", 1), job("a", 1), job("b", 1), job("a", 1), job("b", 1)
    chosen, rest = form_batch(deque([a1, a2, b1, a3, b2]), 1000)
    assert names(chosen) == names([a1, b1])
    assert names(rest) == names([a2, a3, b2])


def test_decode_rounds_go_before_prompt_chunks():
    """After the oldest job, decode rounds are taken before older prompt chunks while the budget allows."""
    c1, c2, d1, d2 = job("c1", 8, chunk=True), job("c2", 8, chunk=True), job("d1", 1), job("d2", 1)
    chosen, rest = form_batch(deque([c1, c2, d1, d2]), 10)
    assert names(chosen) == names([c1, d1, d2])  # c1 is the oldest: always in; then the decodes; c2 does not fit
    assert names(rest) == names([c2])


def test_decode_rounds_are_taken_oldest_first():
    """Among decode rounds (and among chunks), the older goes in first when only some fit."""
    first, d_old, d_new, c_old, c_new = job("x", 1), job("a", 3), job("b", 3), job("c", 3, True), job("d", 3, True)
    chosen, rest = form_batch(deque([first, c_old, d_old, c_new, d_new]), 7)
    assert names(chosen) == names([first, d_old, d_new])
    assert names(rest) == names([c_old, c_new])
    chosen, rest = form_batch(deque([first, c_old, c_new]), 4)
    assert names(chosen) == names([first, c_old]) and names(rest) == names([c_new])


def test_oldest_job_is_admitted_even_over_the_budget():
    """A FORWARD larger than the budget still runs when it is the oldest (alone: nothing else fits)."""
    big, small = job("big", 50, chunk=True), job("small", 1)
    chosen, rest = form_batch(deque([big, small]), 10)
    assert names(chosen) == names([big]) and names(rest) == names([small])


def test_budget_is_respected_and_smaller_jobs_fill_the_gap():
    """Jobs that would exceed the budget are skipped; later smaller ones that fit still go in."""
    a, b, c, d = job("a", 4), job("b", 5), job("c", 2), job("d", 4)
    chosen, rest = form_batch(deque([a, b, c, d]), 10)
    assert names(chosen) == names([a, b])  # 4 + 5 = 9; c (2) would make 11
    assert sum(j.hidden.shape[0] for j in chosen) <= 10
    chosen, rest = form_batch(deque([a, d, b, c]), 10)
    assert names(chosen) == names([a, d, c])  # 4 + 4 = 8, b (5) skipped, c (2) fills to 10
    assert names(rest) == names([b])


def test_leftover_keeps_its_order():
    """What is not chosen stays pending in exactly the order it arrived."""
    jobs = [job("a", 1), job("b", 6, True), job("a", 2), job("c", 6, True), job("b", 1), job("d", 1)]
    chosen, rest = form_batch(deque(jobs), 8)
    taken = {id(j) for j in chosen}
    assert names(rest) == names([j for j in jobs if id(j) not in taken])
    assert isinstance(rest, deque)


def test_input_queue_is_not_modified():
    """form_batch returns a new pending queue and leaves the one it was given alone."""
    jobs = deque([job("a", 1), job("a", 1), job("b", 1)])
    before = names(jobs)
    form_batch(jobs, 10)
    assert names(jobs) == before


@st.composite
def queues(draw):
    sessions = draw(st.integers(1, 6))
    specs = draw(st.lists(st.tuples(st.integers(0, sessions - 1), st.integers(1, 20), st.booleans()),
                          min_size=0, max_size=40))
    return [job(f"s{s}", tokens, chunk) for s, tokens, chunk in specs], draw(st.integers(1, 40))


@settings(max_examples=300, deadline=None)
@given(queues())
def test_repeated_batches_drain_everything_in_session_order(case):
    """Forming batches until nothing is left runs every job exactly once, each session's jobs in arrival order,
    only each session's oldest job in a batch, the oldest pending job in every batch, no batch over the budget
    unless it holds a single job, no eligible job left out that would have fit, no decode round passed over for a
    prompt chunk."""
    jobs, budget = case
    pending = deque(jobs)
    ran: dict[str, list[int]] = {}
    batches = 0
    while pending:
        oldest = pending[0]
        heads = {}
        for j in pending:
            heads.setdefault(j.header.session_id, j)
        chosen, pending = form_batch(pending, budget)
        batches += 1
        assert chosen and chosen[0] is oldest
        assert all(heads[j.header.session_id] is j for j in chosen)  # only each session's oldest
        tokens = sum(j.hidden.shape[0] for j in chosen)
        assert tokens <= budget or len(chosen) == 1
        taken = {id(j) for j in chosen}
        left_out = [j for j in heads.values() if id(j) not in taken]
        assert all(tokens + j.hidden.shape[0] > budget for j in left_out)  # nothing eligible that fit was left out
        if any(j.header.append_only for j in chosen[1:]):  # a chunk went in: no decode round was left out for it
            chunk_tokens = sum(j.hidden.shape[0] for j in chosen[1:] if j.header.append_only)
            assert all(tokens - chunk_tokens + j.hidden.shape[0] > budget
                       for j in left_out if not j.header.append_only)
        for j in chosen:
            ran.setdefault(j.header.session_id, []).append(j.header.sequence)
        assert batches <= len(jobs)
    expected: dict[str, list[int]] = {}
    for j in jobs:
        expected.setdefault(j.header.session_id, []).append(j.header.sequence)
    assert ran == expected
