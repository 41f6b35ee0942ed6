"""Speculative decoding settings (no torch import: the CLI reads the defaults when it builds its parser)."""
from __future__ import annotations

from dataclasses import dataclass

DRAFT_LENGTHS = ("cost", "threshold")  # how a round's draft length is chosen


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    threshold: float = 0.6  # "threshold" lengths: stop drafting when the draft's confidence (calibrated top probability) falls below this
    max_draft: int = 8  # most draft tokens verified in one round
    parallel: bool = True  # keep drafting while a verification is in flight, for the round after it (only while it does not slow the cloud)
    max_predraft: int = 8  # most tokens drafted while one verification is in flight
    # "cost": each round drafts the length (0 = plain decoding) that maximizes expected tokens per second, from the
    # measured draft-step time, verification round time and per-position acceptance; "threshold": draft while confident
    length: str = "cost"
    draft_vocab: int = 0  # draft logits over this many most frequent tokens (the adapter's frequency table); 0 = all

    def __post_init__(self):
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"draft threshold must lie in [0, 1], got {self.threshold}")
        if self.max_draft < 0 or self.max_predraft < 0:
            raise ValueError("max_draft and max_predraft must be 0 or more")
        if self.length not in DRAFT_LENGTHS:
            raise ValueError(f"draft length policy must be one of {', '.join(DRAFT_LENGTHS)}, got {self.length!r}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft vocabulary size must be 0 (all) or more, got {self.draft_vocab}")


DEFAULT_SPECULATION = SpeculationConfig()
