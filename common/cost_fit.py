"""Latency of one forward of a model part, as a linear function fitted from its own timings.

A forward of `tokens` new positions after `start` cached ones costs

    seconds = base_s + per_token_s * tokens + per_attended_s * attended(tokens, start)

where attended = tokens * (start + (tokens + 1) / 2) counts query-key pairs of causal attention. For a
ragged batch the features add up over its sequences. The device fits its input and output parts this
way; the cloud fits its middle part and publishes the fit over the control plane.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np


PROFILE_SHAPES = ((16, 0), (64, 0), (256, 0), (64, 256), (256, 256))  # (tokens, start) of start-up timings
# the cloud's start-up profile adds large chunks (a whole prompt goes to the cloud in one): a fit over chunks of up
# to 256 tokens extrapolated to 1000 missed by about 2x, the attention term and the per-token cost being confounded
CLOUD_PROFILE_SHAPES = PROFILE_SHAPES + ((1024, 0), (512, 512))


def attended(tokens: int, start: int) -> float:
    """Query-key pairs a causal forward of `tokens` positions after `start` cached ones computes."""
    return tokens * (start + (tokens + 1) / 2)


@dataclass(frozen=True, slots=True)
class LinearCost:
    base_s: float  # fixed cost of one forward
    per_token_s: float  # cost of each new position
    per_attended_s: float  # cost of each query-key pair

    def predict(self, tokens: int, start: int = 0) -> float:
        return self.batch(tokens, attended(tokens, start))

    def batch(self, tokens: int, attended_pairs: float) -> float:
        """One forward over new positions and query-key pairs summed over its sequences."""
        return self.base_s + self.per_token_s * tokens + self.per_attended_s * attended_pairs

    def scaled(self, factor: float) -> "LinearCost":
        return LinearCost(self.base_s * factor, self.per_token_s * factor, self.per_attended_s * factor)


ZERO_COST = LinearCost(0.0, 0.0, 0.0)


MIN_TOKEN_SHARE = 0.02  # floor of the per-token cost, as a share of the least seconds per token any timing shows
SIZE_CLASSES = 16  # size classes of forwards (tokens within a factor of two), each keeping its own newest timings
CHANGE_RATIO = 1.5  # a timing this many times off the fit (either way) is a surprise (a loaded machine's noise is less)
CHANGE_RUN = 2  # surprises in a row, all the same way: the hardware changed, and the older timings are rescaled
REFIT_EVERY = 32  # the change watch refits at least once in this many timings (reads of `cost` refit sooner)


class CostFit:
    """Timings of one part and the LinearCost fitted to them.

    - The window keeps the newest `window` timings of each size class (forwards of 1, 2-3, 4-7, ... tokens), so
      that thousands of one-token decode rounds cannot push out the few prompt chunks the large sizes are known by.
    - The fit minimises relative error (a 2 ms forward's 1 ms miss counts as much as a 200 ms one's 100 ms), each
      size class weighing as much as any other, under physical bounds: no negative base or attention cost, and a
      per-token cost of at least MIN_TOKEN_SHARE of the least seconds per token a timing shows (every position of
      a part that computes costs something; noise must not zero it). The bounded least squares is solved
      exactly, by trying each coefficient free or at its bound.
    - A change watch (`follow_changes`): CHANGE_RUN timings in a row off the fit by CHANGE_RATIO the same way mean
      the hardware changed (a power mode, a busy machine): the older timings are rescaled by the surprise's median,
      so the fit follows within a prompt or two instead of a window. Each timing is judged against the fit as it
      stood to the earlier timings of its own size class, so a size whose cost the line's shape misses is not taken
      for a change (nor is a size timed for the first time)."""

    def __init__(self, window: int = 256, fallback: LinearCost = ZERO_COST, follow_changes: bool = True):
        if window < 3:
            raise ValueError(f"window must hold at least 3 timings, got {window}")
        self._classes = [deque(maxlen=window) for _ in range(SIZE_CLASSES)]  # [1, tokens, pairs, seconds, index]
        self._fallback = fallback
        self._fit: LinearCost | None = fallback
        self._follow = follow_changes
        self._reference: LinearCost | None = None  # the last fit solved, for the change watch
        self._since_solve = 0
        self._surprises: list[tuple[int, float]] = []  # (index, measured / predicted) of the current run
        self._added = 0
        self.changes = 0  # changes the watch followed

    def add(self, tokens: float, attended_pairs: float, seconds: float) -> None:
        """One forward's timing: its new positions, its query-key pairs (summed over a batch), its seconds."""
        if not (tokens > 0 and seconds > 0):
            return
        sample = [1.0, float(tokens), float(attended_pairs), float(seconds), self._added]
        self._added += 1
        size_class = self._classes[min(int(tokens).bit_length(), SIZE_CLASSES) - 1]
        if self._follow:
            self._watch(sample, size_class)
        size_class.append(sample)
        self._fit = None
        self._since_solve += 1

    def _watch(self, sample: list, size_class: deque) -> None:
        """A timing is a surprise against the reference line times where the line stands to the earlier timings of
        its size class: a size the line's shape misses (a part changing regime) is no change of the hardware, and a
        size never timed before tells nothing."""
        if self._reference is None or self._since_solve >= REFIT_EVERY:
            if len(self) >= 3:
                self._reference = self.cost
        if self._reference is None or not size_class:
            return
        ratios = [old[3] / line for old in size_class if (line := self._reference.batch(old[1], old[2])) > 0]
        shape = statistics.median(ratios) if ratios else 1.0
        predicted = self._reference.batch(sample[1], sample[2]) * shape
        ratio = sample[3] / predicted if predicted > 0 else 1.0
        if 1 / CHANGE_RATIO < ratio < CHANGE_RATIO:
            self._surprises.clear()
            return
        if self._surprises and (self._surprises[-1][1] > 1) != (ratio > 1):
            self._surprises.clear()
        self._surprises.append((sample[4], ratio))
        if len(self._surprises) < CHANGE_RUN:
            return
        first = self._surprises[0][0]
        factor = float(np.median([r for _, r in self._surprises]))
        for samples in self._classes:
            for old in samples:
                if old[4] < first:
                    old[3] *= factor
        self._surprises.clear()
        self._reference = self._reference.scaled(factor)
        self._fit = None
        self.changes += 1

    def __len__(self) -> int:
        return sum(len(samples) for samples in self._classes)

    @property
    def revision(self) -> int:
        """Changes with every timing taken (and with the rescaling one may bring): equal revisions, equal timings."""
        return self._added

    def size_classes(self) -> list[list[tuple[float, float, float]]]:
        """The timings kept, per size class: (tokens, query-key pairs, seconds) each."""
        return [[(s[1], s[2], s[3]) for s in samples] for samples in self._classes]

    @property
    def cost(self) -> LinearCost:
        if self._fit is None:
            self._fit = self._solve()
            if len(self) >= 3:
                self._reference, self._since_solve = self._fit, 0
        return self._fit

    def _solve(self) -> LinearCost:
        rows = [s for samples in self._classes for s in samples]
        if len(rows) < 2:
            return self._fallback if not rows else _per_token_only(rows)
        data = np.asarray([s[:4] for s in rows])
        counts = np.asarray([len(samples) for samples in self._classes for _ in samples], dtype=float)
        features, seconds = data[:, :3], data[:, 3]
        weight = 1 / (seconds * np.sqrt(counts))  # relative error, each size class weighing alike
        lower = np.array([0.0, MIN_TOKEN_SHARE * float(np.min(seconds / data[:, 1])), 0.0])
        return LinearCost(*map(float, bounded_least_squares(features * weight[:, None], seconds * weight, lower)))


def bounded_least_squares(a: np.ndarray, b: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin |a x - b| subject to x >= lower, for a few columns: the optimum sets some coefficients at their
    bounds and solves for the rest freely, so every such choice is tried and the best feasible one kept."""
    columns = a.shape[1]
    best, best_residual = lower.copy(), float(np.sum((a @ lower - b) ** 2))
    for mask in range(1, 2 ** columns):
        free = [j for j in range(columns) if mask >> j & 1]
        fixed = [j for j in range(columns) if not mask >> j & 1]
        rest = b - a[:, fixed] @ lower[fixed]
        solution, *_ = np.linalg.lstsq(a[:, free], rest, rcond=None)
        if (solution < lower[free]).any():
            continue
        x = lower.copy()
        x[free] = solution
        residual = float(np.sum((a @ x - b) ** 2))
        if residual < best_residual - 1e-18 * max(1.0, best_residual):
            best, best_residual = x, residual
    return best


def _per_token_only(samples) -> LinearCost:
    tokens = sum(s[1] for s in samples)
    return LinearCost(0.0, sum(s[3] for s in samples) / tokens, 0.0)
