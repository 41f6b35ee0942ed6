"""Latency of one forward of a model part, as a linear function fitted from its own timings.

A forward of `tokens` new positions after `start` cached ones costs

    seconds = base_s + per_token_s * tokens + per_attended_s * attended(tokens, start)

where attended = tokens * (start + (tokens + 1) / 2) counts query-key pairs of causal attention. For a
ragged batch the features add up over its sequences. The device fits its input and output parts this
way; the cloud fits its middle part and publishes the fit over the control plane.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


PROFILE_SHAPES = ((16, 0), (64, 0), (256, 0), (64, 256), (256, 256))  # (tokens, start) of start-up timings


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


class CostFit:
    """The newest `window` timings of one part and the LinearCost fitted to them (least squares, no
    negative coefficient: a coefficient that comes out negative is dropped and the rest refitted)."""

    def __init__(self, window: int = 256, fallback: LinearCost = ZERO_COST):
        if window < 3:
            raise ValueError(f"window must hold at least 3 timings, got {window}")
        self._samples: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._fallback = fallback
        self._fit: LinearCost | None = fallback

    def add(self, tokens: float, attended_pairs: float, seconds: float) -> None:
        """One forward's timing: its new positions, its query-key pairs (summed over a batch), its seconds."""
        if tokens > 0 and seconds >= 0:
            self._samples.append((1.0, float(tokens), float(attended_pairs), float(seconds)))
            self._fit = None

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def cost(self) -> LinearCost:
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def _solve(self) -> LinearCost:
        if len(self._samples) < 2:
            return self._fallback if not self._samples else _per_token_only(self._samples)
        data = np.asarray(self._samples)
        features, seconds = data[:, :3], data[:, 3]
        active = [0, 1, 2]
        while active:
            coef, *_ = np.linalg.lstsq(features[:, active], seconds, rcond=None)
            if (coef >= 0).all():
                full = np.zeros(3)
                full[active] = coef
                return LinearCost(*map(float, full))
            active.pop(int(np.argmin(coef)))
        return _per_token_only(self._samples)


def _per_token_only(samples) -> LinearCost:
    tokens = sum(s[1] for s in samples)
    return LinearCost(0.0, sum(s[3] for s in samples) / tokens, 0.0)
