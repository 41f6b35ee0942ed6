"""The cloud-only server's settings, apart from the server so that the simulator reads them without torch or zmq."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CloudOnlyConfig:
    token_budget: int = 512  # prompt tokens per engine iteration, decoding requests' tokens included (Sarathi)
    max_active: int = 256  # requests served at once; more are refused with an ERROR
    idle_poll_ms: int = 50  # how long an idle server waits for a message before checking whether to stop
    max_drain: int = 256  # messages taken in per engine iteration, at most (a flood cannot stall generation)

    def __post_init__(self) -> None:
        if min(self.token_budget, self.max_active, self.idle_poll_ms, self.max_drain) < 1:
            raise ValueError(f"every CloudOnlyConfig field must be at least 1: {self}")
