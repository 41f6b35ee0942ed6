"""Which pending FORWARDs go into the next forward of the middle part (hybrid batches, Sarathi-style).

Only each session's oldest pending FORWARD is eligible, so a session's messages run in order, one per
batch. The oldest eligible one always goes in (nothing starves); then decode and verification rounds
(few tokens, and a device is waiting on each for its next token) before prompt chunks, each group
oldest first, while the batch stays within the token budget.
"""
from __future__ import annotations

from collections import deque

from .middle_worker import ForwardJob


def form_batch(pending: deque[ForwardJob], max_tokens: int) -> tuple[list[ForwardJob], deque[ForwardJob]]:
    """The next batch and what stays pending (in its order)."""
    heads, seen = [], set()
    for job in pending:
        session = job.header.session_id
        if session not in seen:
            seen.add(session)
            heads.append(job)
    if not heads:
        return [], deque()
    chosen, tokens = [heads[0]], heads[0].hidden.shape[0]
    for job in sorted(heads[1:], key=lambda j: j.header.append_only):  # stable: decode rounds first, then chunks
        count = job.hidden.shape[0]
        if tokens + count <= max_tokens:
            chosen.append(job)
            tokens += count
    taken = {id(job) for job in chosen}
    return chosen, deque(job for job in pending if id(job) not in taken)
