"""What one generation reports: per-round timings, the result with its metrics, and streamed text."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass(slots=True)
class StepTiming:
    """Where one cloud round's time went (milliseconds), and for a speculative round what it drafted."""
    tokens: int  # positions sent in this round
    device_ms: float  # input part + output layers on the device, drafting excluded (the head and sampling are not in it)
    round_ms: float  # send to reply, as the device saw it
    cloud_compute_ms: float  # the middle-part forward, as the cloud measured it
    decode: bool = False  # a decode (verification) round, not a prompt piece
    drafted: int = 0  # draft tokens verified in this round
    accepted: int = 0  # of those, accepted
    draft_ms: float = 0.0  # drafting before the send (drafting while the round was in flight is not in it)
    predrafted: int = 0  # tokens drafted while this round was in flight
    predraft_reused: int = 0  # of those, kept for the next round
    sent_s: float = 0.0  # the device's perf_counter when the round's request went out (for timelines)
    in_cloud_ms: float = 0.0  # the request's time in the cloud, arrival to reply (queueing and its batch's forward)
    batch_sessions: int = 0  # sessions in the cloud's batch that ran it (1: it had the forward to itself)


def in_cloud_ms(header) -> float:
    """A reply header's time in the cloud (its request's arrival to the reply's send, the cloud's clock), ms."""
    return max(0, header.sent_us - header.arrival_us) / 1000 if header.sent_us else 0.0


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]  # generated ids only (an end-of-sequence id included when it ended the generation)
    text: str  # decoded generated text, special tokens skipped
    prompt_tokens: int  # length of the tokenized prompt
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens or the context filled)
    ttft_ms: float  # from the call to the first generated token
    tbt_ms: list[float] = field(default_factory=list)  # one per token after the first: time since the previous token
    bytes_up: int = 0  # data-plane bytes sent (headers + hidden states)
    bytes_down: int = 0  # data-plane bytes received
    speculative: bool = False  # drafted on the device and verified in the cloud
    recoveries: int = 0  # times the cloud had lost the session and the device re-sent its history
    chunking: str = "adaptive"  # how the prompt was cut: "adaptive" (planned), "fixed" (--chunk-size), "none"
    chunks: list[int] = field(default_factory=list)  # prompt chunk sizes as sent, in order
    ttft_predicted_ms: float = 0.0  # ttft_ms as the chunk plan predicted it (the time before the prefill as measured)
    replans: int = 0  # times the rest of the prompt was re-planned because a measured rate drifted
    plan_ms: float = 0.0  # time spent planning chunks (inside ttft_ms)
    admission_waits: int = 0  # times the cloud was full (KV memory, sessions) and the device waited to open
    steps: list[StepTiming] = field(default_factory=list)  # per round, for benchmarks (not in to_json)

    @property
    def decode_rounds(self) -> list[StepTiming]:
        return [s for s in self.steps if s.decode]

    @property
    def accept_len(self) -> float:
        """Tokens gained per decode round, the corrected or bonus token included (1.0 without speculation)."""
        rounds = self.decode_rounds
        return sum(s.accepted + 1 for s in rounds) / len(rounds) if rounds else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        del out["steps"]
        rounds = self.decode_rounds
        out["rounds"] = len(rounds)
        out["accept_len"] = round(self.accept_len, 4)
        out["draft_ms"] = sum(s.draft_ms for s in rounds)
        out["round_ms_mean"] = sum(s.round_ms for s in rounds) / len(rounds) if rounds else 0.0
        out["drafted_tokens"] = sum(s.drafted for s in rounds)
        out["wasted_draft_tokens"] = sum(s.drafted - s.accepted + s.predrafted - s.predraft_reused for s in rounds)
        out["predraft_reused_tokens"] = sum(s.predraft_reused for s in rounds)
        out["device_ms"] = sum(s.device_ms for s in self.steps)
        out["cloud_compute_ms"] = sum(s.cloud_compute_ms for s in self.steps)
        out["network_ms"] = sum(s.round_ms - s.cloud_compute_ms for s in self.steps)
        return out


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text, self.emitted = tokenizer, on_text, ""

    def update(self, token_ids: list[int], final: bool = False) -> None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if self.on_text is not None and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
        self.emitted = text
