"""Chooses how to cut a prompt into chunks: the cut the pipeline cost model predicts to reach the first
token soonest, among all its candidates weighed under one cost model: the whole prompt, every fixed size,
even cuts and ramps (small chunks first to fill the pipeline, then the chunk size that keeps the slowest stage
busy, optionally small again at the end to drain it). So it never predicts itself worse than the trivial cuts, but
for one rule: it keeps the whole prompt unless a cut is predicted WHOLE_PROMPT_MARGIN faster. The search is part of
the time to the first token, so it is kept short: a cut's simulation stops once it falls behind the best so far,
and on shared cores, where no cut can gain that margin over the whole prompt, there is no search."""
from __future__ import annotations

import math
from dataclasses import dataclass

from hat.common.prefill_pipeline import PipelineCosts, simulate_prefill


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    enabled: bool = True  # False (--no-chunking): the prompt goes whole, in pieces only past the cloud's message limit
    fixed_size: int = 0  # --chunk-size N: every chunk N tokens; 0 = sizes chosen by the planner
    min_chunk: int = 16  # smallest chunk the planner considers
    max_chunks: int = 64  # most chunks the planner cuts one prompt into
    max_in_flight: int = 8  # prompt chunks sent and not yet answered, at most
    replan_drift: float = 0.25  # re-plan the rest of a prompt when a measured rate moves this far from the plan's
    shared_host: bool | None = None  # the device and the cloud compute on the same cores; None: so when the cloud is
    # on loopback and this process may use every core with as many torch threads (see device/prefill.py)

    def __post_init__(self) -> None:
        if self.fixed_size < 0:
            raise ValueError(f"the chunk size must be positive, got {self.fixed_size}")
        if self.fixed_size and not self.enabled:
            raise ValueError("a fixed chunk size and no chunking contradict each other")
        for name in ("min_chunk", "max_chunks", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.replan_drift > 0:
            raise ValueError(f"replan_drift must be positive, got {self.replan_drift}")

    @property
    def mode(self) -> str:
        return "none" if not self.enabled else "fixed" if self.fixed_size else "adaptive"


DEFAULT_CHUNKING = ChunkingConfig()


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    sizes: tuple[int, ...]  # chunk sizes in prompt order
    predicted_s: float  # predicted time from the start of this plan to the first token


def even_cut(tokens: int, pieces: int) -> list[int]:
    base, extra = divmod(tokens, pieces)
    return [base + 1] * extra + [base] * (pieces - extra)


def fixed_cut(tokens: int, size: int) -> list[int]:
    return [size] * (tokens // size) + ([tokens % size] if tokens % size else [])


def ramp_cut(tokens: int, first: int, steady: int, taper: bool) -> list[int]:
    """Chunks doubling from `first` up to `steady`, then `steady`; with `taper`, halving again at the end."""
    head, size = [], first
    while size < steady and sum(head) + size < tokens:
        head.append(size)
        size *= 2
    tail = list(reversed(head)) if taper else []
    middle = tokens - sum(head) - sum(tail)
    while middle <= 0 and tail:
        middle += tail.pop(0)
    if middle <= 0:
        return even_cut(tokens, math.ceil(tokens / steady))
    return head + even_cut(middle, math.ceil(middle / steady)) + tail


FIXED_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)  # fixed chunk sizes among the planner's candidates
# a prompt that fits one message goes whole unless a cut is predicted this much faster: one forward per part,
# which the model knows best, where every cut adds per-message costs and, on shared cores, contention that the model
# learns only after it has cost a prompt (the reference model's 2048-token prompt on loopback: two 1024-token chunks,
# predicted a few percent faster, ran 8-25% slower)
WHOLE_PROMPT_MARGIN = 0.03


def hideable_s(tokens: int, costs: PipelineCosts) -> float:
    """On shared cores, the most a cut of `tokens` positions can gain over sending them whole: one processor
    computes every stage in turn, so a cut hides at most the whole prompt's link time and the cloud's queue, while
    each chunk adds its fixed costs (the attention's query-key pairs sum to the same over any cut). Exact for
    LinearCost stages; LocalCost's size corrections are what WHOLE_PROMPT_MARGIN resists."""
    return costs.up_s(tokens) + costs.down_s(tokens) + costs.rtt_s + costs.cloud_queue_s


class ChunkPlanner:
    def __init__(self, config: ChunkingConfig = DEFAULT_CHUNKING):
        self.config = config

    def plan(self, tokens: int, costs: PipelineCosts, max_chunk: int, start: int = 0,
             in_flight: tuple[int, ...] = ()) -> ChunkPlan:
        """Cut `tokens` prompt positions from `start` into chunks of at most `max_chunk` (the cloud's limit).
        `in_flight`: sizes of the chunks sent just before `start` and not yet answered (a re-plan mid-prompt)."""
        if tokens < 1:
            raise ValueError("nothing to plan: the prompt is empty")
        c = self.config
        if c.mode == "none":
            return self.evaluate(even_cut(tokens, math.ceil(tokens / max_chunk)), costs, start, in_flight)
        if c.mode == "fixed":
            return self.evaluate(fixed_cut(tokens, min(c.fixed_size, max_chunk)), costs, start, in_flight)
        fewest = math.ceil(tokens / max_chunk)
        # the trivial choices first: the whole prompt (in the fewest messages) and every fixed size
        best = whole = self.evaluate(even_cut(tokens, fewest), costs, start, in_flight)
        if fewest == 1 and costs.shared_compute and hideable_s(tokens, costs) * (1 + WHOLE_PROMPT_MARGIN) <= \
                WHOLE_PROMPT_MARGIN * whole.predicted_s:
            return whole  # no cut can be predicted WHOLE_PROMPT_MARGIN faster (see hideable_s): skip the search
        for size in FIXED_SIZES:
            if c.min_chunk <= size < min(tokens, max_chunk + 1) and \
                    math.ceil(tokens / size) <= max(c.max_chunks, fewest):
                best = self._better(best, self.evaluate(fixed_cut(tokens, size), costs, start, in_flight, best))
        most = max(fewest, min(c.max_chunks, tokens // c.min_chunk))
        grid = sorted({fewest, most, *(round(fewest * 1.25 ** i) for i in range(40) if fewest * 1.25 ** i <= most)})
        even: dict[int, ChunkPlan] = {}  # piece count -> plan (infinity: behind the best even cut)
        best_even = None

        def try_even(k: int) -> None:
            nonlocal best_even
            even[k] = self.evaluate(even_cut(tokens, k), costs, start, in_flight, best_even)
            best_even = self._better(best_even, even[k])

        for k in grid:
            try_even(k)
        at = grid.index(len(best_even.sizes))  # then every piece count between the best one's grid neighbours
        for k in range(grid[max(0, at - 1)], grid[min(len(grid) - 1, at + 1)] + 1):
            if k not in even:
                try_even(k)
        best = self._better(best, best_even)
        steady = max(best_even.sizes)
        for target in {steady // 2, steady, steady * 2}:
            target = min(max(target, c.min_chunk), max_chunk, tokens)
            first = c.min_chunk
            while first < target:
                for taper in (False, True):
                    sizes = ramp_cut(tokens, first, target, taper)
                    if len(sizes) <= max(c.max_chunks, fewest) and max(sizes) <= max_chunk:
                        best = self._better(best, self.evaluate(sizes, costs, start, in_flight, best))
                first *= 2
        kept = fewest == 1 and whole.predicted_s <= best.predicted_s * (1 + WHOLE_PROMPT_MARGIN)
        return whole if kept else best

    def evaluate(self, sizes: list[int], costs: PipelineCosts, start: int, in_flight: tuple[int, ...] = (),
                 beat: ChunkPlan | None = None) -> ChunkPlan:
        """The plan of cutting into `sizes`, with its predicted time to the first token; given `beat`, a plan
        predicted no sooner than it may get infinity instead (its simulation stopped once it could not win)."""
        limit = math.inf if beat is None else beat.predicted_s
        return ChunkPlan(tuple(sizes), simulate_prefill(sizes, costs, self.config.max_in_flight, start, in_flight,
                                                        limit).ttft_s)

    @staticmethod
    def _better(a: ChunkPlan | None, b: ChunkPlan) -> ChunkPlan:
        return b if a is None or b.predicted_s < a.predicted_s else a
