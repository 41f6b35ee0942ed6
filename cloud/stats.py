"""Counters the cloud publishes over the control plane."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CloudStats:
    forward_batches: int = 0  # middle-part forwards run
    forward_tokens: int = 0  # tokens through the middle part
    errors: int = 0  # ERROR replies sent
    max_batch_sessions: int = 0  # most sessions seen in one forward
