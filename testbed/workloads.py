"""Workloads for testbed experiments, built from the reference corpus (nothing is downloaded).

Prompt lengths follow a Weibull distribution fitted exactly to a public dataset's mean and 90th
percentile: SpecBench (mean ~351 tokens, p90 ~891) and CNN/DailyMail (mean ~1037, p90 ~1772). A
lognormal cannot fit SpecBench: its p90/mean ratio (2.54) is above the most any lognormal reaches
(e^0.82 = 2.27); a Weibull of shape k has p90/mean = (ln 10)^(1/k) / Gamma(1 + 1/k), which falls
from 2.67 at k = 0.6 towards 1 as k grows (k ~0.77 for SpecBench, ~2.0 for CNN/DailyMail). Lengths are rounded and
clipped to [min_tokens, max_prompt_tokens]; how many were clipped is reported, since a model's
context may be shorter than the dataset's tail.

Prompt text: a window of that many tokens at a random offset of the corpus's held-out files (the
reference model and its adapter never trained on them), so prompts are real code the model has not
seen. Arrivals are a Poisson process of the given rate; every request may generate up to
`max_new_tokens` (128, as HAT's experiments). The same seed gives the same workload.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from .records import percentile

_POOL_TOKENS = 400_000  # held-out tokens kept to cut prompts from (enough for thousands of distinct windows)


@dataclass(frozen=True, slots=True)
class LengthShape:
    name: str  # what it imitates
    mean: float  # mean prompt length, tokens
    p90: float  # 90th percentile, tokens
    min_tokens: int = 8  # shortest prompt drawn

    def weibull(self) -> tuple[float, float]:
        """(shape k, scale) of the Weibull with this mean and p90."""
        return weibull_for(self.mean, self.p90)


SPECBENCH = LengthShape("specbench", 351.0, 891.0)
CNN_DAILYMAIL = LengthShape("cnn_dailymail", 1037.0, 1772.0)
SHAPES = {shape.name: shape for shape in (SPECBENCH, CNN_DAILYMAIL)}


def weibull_for(mean: float, p90: float) -> tuple[float, float]:
    """The Weibull (shape k, scale) whose mean and 90th percentile are the given ones (bisection on k >= 0.6, where
    the ratio p90/mean falls strictly as k grows, from 2.67 towards 1; below, it peaks and falls again)."""
    if not 0 < mean < p90:
        raise ValueError(f"need 0 < mean < p90, got mean {mean} and p90 {p90}")

    def ratio(k: float) -> float:
        return math.log(10) ** (1 / k) / math.gamma(1 + 1 / k)

    target, low, high = p90 / mean, 0.6, 50.0
    if not ratio(high) < target < ratio(low):
        raise ValueError(f"p90/mean = {target:.3f} is outside what a Weibull can give here")
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) > target else (low, middle)
    k = (low + high) / 2
    return k, mean / math.gamma(1 + 1 / k)


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    arrival_s: float  # from the start of the run
    prompt_ids: tuple[int, ...]  # the prompt's token ids (the model's tokenizer)
    max_new_tokens: int  # generation budget
    source: str  # where the prompt came from: held-out file and token offset, or a prompt set's item id
    category: str = ""  # the prompt's category in a real prompt set (conversation, code, summarization); "" else


@dataclass(frozen=True, slots=True)
class WorkloadSummary:
    requests: int
    mean_tokens: float  # prompt lengths as generated (after clipping)
    p50_tokens: float
    p90_tokens: float
    clipped: int  # lengths drawn above max_prompt_tokens and cut to it (prompt sets: prompts passed over as too long)
    rate_per_s: float  # requests / span of arrivals
    clip_word: str = "clipped"  # what `clipped` counts, as the line says it

    def line(self) -> str:
        return (f"{self.requests} requests, prompt tokens mean {self.mean_tokens:.0f} p50 {self.p50_tokens:.0f} "
                f"p90 {self.p90_tokens:.0f} ({self.clipped} {self.clip_word}), {self.rate_per_s:.2f} requests/s")


def prompt_lengths(shape: LengthShape, count: int, rng: random.Random, max_prompt_tokens: int) -> tuple[list[int], int]:
    """`count` lengths from the shape, and how many were clipped to `max_prompt_tokens`."""
    k, scale = shape.weibull()
    lengths, clipped = [], 0
    for _ in range(count):
        n = max(shape.min_tokens, round(rng.weibullvariate(scale, k)))
        if n > max_prompt_tokens:
            n, clipped = max_prompt_tokens, clipped + 1
        lengths.append(n)
    return lengths, clipped


def heldout_token_pool(tokenizer, limit: int = _POOL_TOKENS) -> list[tuple[str, list[int]]]:
    """(relpath, token ids) of held-out corpus files, in corpus order, up to about `limit` tokens in all."""
    from hat.common.reference_corpus import heldout_files

    pool, total = [], 0
    for file in heldout_files():
        ids = tokenizer(file.read(), add_special_tokens=False)["input_ids"]
        if ids:
            pool.append((file.relpath, ids))
            total += len(ids)
        if total >= limit:
            break
    if not pool:
        raise RuntimeError("the reference corpus has no held-out files on this interpreter")
    return pool


def build_workload(tokenizer, shape: LengthShape, count: int, rate_per_s: float, seed: int = 0,
                   max_new_tokens: int = 128, max_prompt_tokens: int = 4096,
                   pool: list[tuple[str, list[int]]] | None = None) -> tuple[list[WorkloadRequest], WorkloadSummary]:
    """`count` requests of `shape`-like prompt lengths arriving as a Poisson process of `rate_per_s`."""
    if count < 1 or not rate_per_s > 0 or max_new_tokens < 1:
        raise ValueError("a workload needs count >= 1, a positive rate and max_new_tokens >= 1")
    if max_prompt_tokens < shape.min_tokens:
        raise ValueError(f"max_prompt_tokens {max_prompt_tokens} is below the shortest prompt {shape.min_tokens}")
    rng = random.Random(seed)
    pool = pool if pool is not None else heldout_token_pool(tokenizer)
    joined: list[int] = []
    starts: list[tuple[int, str]] = []  # where each file begins in the joined pool
    for relpath, ids in pool:
        starts.append((len(joined), relpath))
        joined.extend(ids)
    lengths, clipped = prompt_lengths(shape, count, rng, max_prompt_tokens)
    if max(lengths) > len(joined):
        raise ValueError(f"the corpus pool holds {len(joined)} tokens, fewer than a {max(lengths)}-token prompt")
    requests, arrival = [], 0.0
    for n in lengths:
        arrival += rng.expovariate(rate_per_s)
        offset = rng.randrange(0, len(joined) - n + 1)
        relpath = max((s for s in starts if s[0] <= offset), key=lambda s: s[0])[1]
        requests.append(WorkloadRequest(arrival, tuple(joined[offset:offset + n]), max_new_tokens,
                                        f"{relpath}@{offset}"))
    summary = WorkloadSummary(count, statistics.fmean(lengths), statistics.median(lengths),
                              percentile(lengths, 90), clipped, count / requests[-1].arrival_s)
    return requests, summary

