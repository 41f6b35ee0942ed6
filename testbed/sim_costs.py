"""What the simulator's system costs: compute of devices and cloud, per-round overheads, speculation.

Every cost is one of the cost models the system itself uses (hat.common.cost_fit.LinearCost: a part's
forward over (tokens, cached positions)), or a roofline of public hardware figures with the same
`predict` (hat.testbed.roofline.RooflineCost). Where they come from: `testbed.calibration` (a real
testbed run's own fitted models and measured rounds) or `testbed.sim_hardware` (roofline figures).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Protocol

from hat.cloud.config import CloudConfig
from hat.common.cost_fit import LinearCost, attended
from hat.device.prefill import HEADER_BYTES


_CLOUD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CloudConfig)}  # the real cloud's settings
BATCH_TOKENS = _CLOUD_DEFAULTS["max_batch_tokens"]  # its per-forward token budget
MESSAGE_TOKENS = _CLOUD_DEFAULTS["max_tokens_per_message"]  # its per-message limit
DEFAULT_TBT_SLO_S = _CLOUD_DEFAULTS["default_tbt_slo_ms"] / 1000  # its target for sessions that name none


class Cost(Protocol):
    def predict(self, tokens: int, start: int = 0) -> float: ...


def batch_seconds(cost, spans: list[tuple[int, int]]) -> float:
    """One batched forward over sequences of (new tokens, cached positions)."""
    if hasattr(cost, "spans"):
        return cost.spans(spans)
    return cost.batch(sum(n for n, _ in spans), sum(attended(n, s) for n, s in spans))


@dataclass(frozen=True, slots=True)
class DeviceCosts:
    """One device class's compute in its top power mode, seconds (the simulator scales it by the power mode)."""
    input: Cost  # input part over a prompt chunk (with the draft adapter's cache when the system drafts)
    output: Cost  # output part over a prompt chunk's reply
    final_s: float  # head and sampling of the first token
    before_round: LinearCost  # a decode round before its send, over the tokens drafted in it (plain decoding:
    # predict(1), the input part over one token)
    after_round: LinearCost  # a decode round after its reply, over the positions verified (output part, head,
    # sampling and verification)
    planner_input: LinearCost  # what the device's chunk planner believes of `input` (its fitted profile)
    planner_output: LinearCost  # and of `output`
    draft_token_s: float = 0.0  # one drafted token (bounds drafting ahead while a round is in flight)
    idle_round_s: float = 0.0  # a speculative round that drafts nothing fresh, before its generation gives up
    # speculating (hat.device.draft_length.GIVE_UP_ROUNDS): the adapter over its token and the length choice


@dataclass(frozen=True, slots=True)
class SpeculationModel:
    """Verification rounds as (drafted, accepted, kept): tokens drafted and verified, accepted of them, and
    tokens drafted while the round was in flight and kept for the next. The simulator draws rounds from it."""
    rounds: tuple[tuple[int, int, int], ...]
    source: str  # where the rounds come from, for the report
    per_request: dict | None = None  # request index -> its rounds in order, as a real run had them (greedy
    # decoding is deterministic, so a request replays them; past its last, or without any, rounds are drawn)

    def __post_init__(self):
        if not self.rounds:
            raise ValueError("a speculation model needs at least one round")
        if any(not 0 <= a <= d or r < 0 for d, a, r in self.rounds):
            raise ValueError("each round needs 0 <= accepted <= drafted and kept >= 0")

    def draw(self, rng: random.Random, limit: int, request: int | None = None, index: int = 0) -> tuple[int, int, int]:
        """Round `index` of `request`, at most `limit` drafted (the request's remaining budget less its bonus
        token): its recorded round if there is one, else one drawn at random."""
        recorded = (self.per_request or {}).get(request) or ()
        if index < len(recorded):
            drafted, accepted, kept = recorded[index]
        else:
            drafted, accepted, kept = self.rounds[rng.randrange(len(self.rounds))]
        drafted = min(drafted, limit)
        return drafted, min(accepted, drafted), kept if accepted >= drafted else 0

    def accept_len(self) -> float:
        return sum(a + 1 for _, a, _ in self.rounds) / len(self.rounds)

    @classmethod
    def geometric(cls, rate: float, draft_tokens: int, max_predraft: int, seed: int = 0,
                  samples: int = 4096) -> "SpeculationModel":
        """Each drafted token accepted with probability `rate` while all before it were; a round drafts
        `draft_tokens`; a fully accepted round keeps what was drafted ahead when its bonus token is guessed too
        (probability `rate`), up to `max_predraft`."""
        if not 0 <= rate <= 1 or draft_tokens < 1:
            raise ValueError("acceptance rate in [0, 1] and draft_tokens >= 1")
        rng, rounds = random.Random(seed), []
        for _ in range(samples):
            accepted = 0
            while accepted < draft_tokens and rng.random() < rate:
                accepted += 1
            kept = max_predraft if accepted == draft_tokens and rng.random() < rate else 0
            rounds.append((draft_tokens, accepted, kept))
        return cls(tuple(rounds), f"geometric: {draft_tokens} drafted per round, each accepted with p={rate:g}")


@dataclass(frozen=True, slots=True)
class SystemCosts:
    """Everything the simulator needs to know about one system's costs."""
    devices: dict  # device class name -> DeviceCosts
    cloud: Cost  # the middle part's batch latency (batch_seconds)
    cloud_predictor: LinearCost  # the cloud's published fit: its scheduler's SLO check and the devices' planners
    overhead_s: float  # per round trip beyond the link model and the cloud (sockets, framework, the link shim)
    speculation: SpeculationModel | None  # None: the system decodes one token per round
    up_bytes_per_token: float  # hidden-state bytes per position sent
    down_bytes_per_token: float  # bytes per position returned (0: only the last position of a prompt chunk)
    message_bytes: float = HEADER_BYTES  # header bytes per message
    max_message_tokens: int = MESSAGE_TOKENS  # the cloud's per-message limit
    max_batch_tokens: int = BATCH_TOKENS  # the cloud's per-forward token budget (cloud-only: its server's, which also cuts
    # prompts to it)
    kv_positions: int = 0  # the cloud's KV room in positions over all sessions (0: unlimited)
    tbt_slo_s: float = 0.0  # the TBT target devices name at OPEN (the scheduler keeps batches within it)
    new_tokens: dict | None = None  # request index -> tokens generated (a real run's; None: every budget used)
    cloud_tokens: bool = False  # cloud-only: token ids cross, the cloud runs the whole model and streams tokens
    notes: tuple[str, ...] = ()  # where the costs come from, for the report


@dataclass(frozen=True, slots=True)
class SequenceCost:
    """A LinearCost for a batch's positions plus a cost for each sequence beyond the first: a server whose ragged
    forward does per-sequence work (attention, the head, sampling) pays it once more for every sequence it batches."""
    cost: LinearCost  # one sequence's forward (as LinearCost.predict)
    per_sequence_s: float  # added for each further sequence in the batch

    def __post_init__(self):
        if not self.per_sequence_s >= 0:
            raise ValueError(f"per_sequence_s must be >= 0, got {self.per_sequence_s}")

    def predict(self, tokens: int, start: int = 0) -> float:
        return self.cost.predict(tokens, start)

    def spans(self, spans: list[tuple[int, int]]) -> float:
        spans = [(n, s) for n, s in spans if n]
        return (self.cost.batch(sum(n for n, _ in spans), sum(attended(n, s) for n, s in spans))
                + self.per_sequence_s * max(0, len(spans) - 1)) if spans else 0.0


def scaled(cost: LinearCost, factor: float) -> LinearCost:
    return cost.scaled(factor) if factor != 1 else cost


ZERO = LinearCost(0.0, 0.0, 0.0)
