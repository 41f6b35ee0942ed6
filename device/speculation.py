"""Speculative decoding settings (no torch import: the CLI reads the defaults when it builds its parser)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    threshold: float = 0.6  # stop drafting when the draft's confidence (calibrated top probability) falls below this
    max_draft: int = 8  # most draft tokens verified in one round
    parallel: bool = True  # keep drafting while a verification is in flight, for the round after it
    max_predraft: int = 8  # most tokens drafted while one verification is in flight

    def __post_init__(self):
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"draft threshold must lie in [0, 1], got {self.threshold}")
        if self.max_draft < 0 or self.max_predraft < 0:
            raise ValueError("max_draft and max_predraft must be 0 or more")


DEFAULT_SPECULATION = SpeculationConfig()
