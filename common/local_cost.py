"""A fitted cost line corrected near the sizes it was timed at.

A LinearCost (base + per token + per query-key pair) is the right shape for a forward within one regime, but a
part changes regime across sizes: small forwards are bound by reading the weights, large ones by arithmetic.
SmolLM2's 27 cloud layers on 2 shared cores took 120 ms for 32 tokens, 440 ms for 256 and 1700 ms for 1024; the
line through all of them put the 1024-token forward 5-10% high, and the whole-prompt prediction with it. The
planner needs the cost right at the sizes it cuts prompts into, which are the sizes it has timed.

LocalCost multiplies the line by a factor: exp of a weighted mean over the fit's size classes of the median
log(measured / line) of their timings, each class weighed by its timings and a Gaussian kernel over log2 sizes,
and the line itself weighing PRIOR_TIMINGS timings at log ratio 0. Near timed sizes the cost follows their
timings; far from every timing it is the line. The factor is positive: no prediction is zero or negative where the
line's is not.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np

from .cost_fit import CostFit, LinearCost

KERNEL_WIDTH = 0.5  # standard deviation of the kernel over log2(tokens): a class a doubling away weighs 14%
PRIOR_TIMINGS = 1.0  # the line's own weight, in timings at the size predicted (one lone timing moves it halfway)


@dataclass(frozen=True, slots=True)
class Anchor:
    log2_tokens: float  # mean log2 of the tokens of one size class's timings
    log_ratio: float  # median log(measured seconds / the line's) of those timings
    timings: int  # how many timings the class holds


@dataclass(frozen=True, slots=True)
class LocalCost:
    line: LinearCost  # the fitted line
    anchors: tuple[Anchor, ...] = ()  # per size class with timings: where the line misses them
    _factors: dict = field(default_factory=dict, compare=False, repr=False)  # memo: tokens -> factor

    @property
    def base_s(self) -> float:
        return self.line.base_s

    def factor(self, tokens: float) -> float:
        """What the line is multiplied by for a forward of `tokens` new positions."""
        known = self._factors.get(tokens)
        if known is not None:
            return known
        x = math.log2(max(tokens, 1.0))
        weight = total = 0.0
        for anchor in self.anchors:
            w = anchor.timings * math.exp(-0.5 * ((x - anchor.log2_tokens) / KERNEL_WIDTH) ** 2)
            weight += w
            total += w * anchor.log_ratio
        factor = self._factors[tokens] = math.exp(total / (weight + PRIOR_TIMINGS))
        return factor

    def predict(self, tokens: int, start: int = 0) -> float:
        return self.line.predict(tokens, start) * self.factor(tokens)

    def batch(self, tokens: int, attended_pairs: float) -> float:
        return self.line.batch(tokens, attended_pairs) * self.factor(tokens)

    def scaled(self, factor: float) -> "LocalCost":
        return LocalCost(self.line.scaled(factor), self.anchors)


_MEMO: "weakref.WeakKeyDictionary[CostFit, tuple]" = weakref.WeakKeyDictionary()  # fit -> (revision, line, cost)


def local_cost(fit: CostFit, line: LinearCost | None = None) -> LocalCost:
    """`line` (default: the fit's own) with the anchors of the fit's timings: where that line misses them. Kept
    until the fit takes a timing or the line changes: the planner asks for every part's cost before each prompt,
    and computing the anchors took most of its time on short prompts (0.75 ms a part against 0.9 ms for the plan
    of 256 tokens)."""
    line = fit.cost if line is None else line
    memo = _MEMO.get(fit)
    if memo is not None and memo[0] == fit.revision and memo[1] == line:
        return memo[2]
    anchors = []
    for timings in fit.size_classes():
        if not timings:
            continue
        tokens, pairs, seconds = np.asarray(timings, dtype=float).T
        predicted = line.batch(tokens, pairs)  # elementwise over the class's timings
        known = predicted > 0
        if known.any():
            anchors.append(Anchor(float(np.mean(np.log2(tokens[known]))),
                                  float(np.median(np.log(seconds[known] / predicted[known]))), int(known.sum())))
    cost = LocalCost(line, tuple(anchors))
    _MEMO[fit] = (fit.revision, line, cost)
    return cost
