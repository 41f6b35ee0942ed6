"""Which pending FORWARDs go into the next forward of the middle part (hybrid batches, Sarathi-style).

Only each session's oldest pending FORWARD is eligible, so a session's messages run in order, one per
batch. The oldest eligible one always goes in (nothing starves); then decode and verification rounds
(few tokens, and a device is waiting on each for its next token) before prompt chunks, each group
oldest first, while the batch stays within the token budget. SLO-aware: when the batch holds decode
rounds, a prompt chunk joins only if the latency predictor says the forward still ends within the
tightest time-between-rounds target of those rounds' sessions (a long prompt must not stall others'
decoding); without decode rounds prompt chunks fill the token budget.
"""
from __future__ import annotations

from collections import deque

from hat.common.cost_fit import LinearCost, attended

from .middle_worker import ForwardJob


def predicted_s(cost: LinearCost, jobs: list[ForwardJob]) -> float:
    """The latency predictor's time for one forward over `jobs`."""
    return cost.batch(sum(j.tokens for j in jobs), sum(attended(j.tokens, j.start) for j in jobs))


def form_batch(pending: deque[ForwardJob], max_tokens: int,
               cost: LinearCost | None = None) -> tuple[list[ForwardJob], deque[ForwardJob]]:
    """The next batch and what stays pending (in its order). `cost`: the latency predictor (None: no SLO check)."""
    heads, seen = [], set()
    for job in pending:
        session = job.session_key
        if session not in seen:
            seen.add(session)
            heads.append(job)
    if not heads:
        return [], deque()
    chosen, tokens = [heads[0]], heads[0].tokens
    for job in sorted(heads[1:], key=lambda j: j.append_only):  # stable: decode rounds first, then chunks
        count = job.tokens
        if tokens + count > max_tokens:
            continue
        if job.append_only and cost is not None:
            targets = [j.tbt_slo_s for j in chosen if not j.append_only and j.tbt_slo_s]
            if targets and predicted_s(cost, chosen + [job]) > min(targets):
                continue
        chosen.append(job)
        tokens += count
    taken = {id(job) for job in chosen}
    return chosen, deque(job for job in pending if id(job) not in taken)
