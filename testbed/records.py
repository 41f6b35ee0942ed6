"""What a testbed experiment records per request, and the per-system summary computed from it."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class TimelineStep:
    """One cloud round of a request, as the device saw it (milliseconds from the generation's start)."""
    kind: str  # "prefill" (a prompt chunk) or "decode" (a plain or verification round)
    tokens: int  # positions sent
    sent_ms: float  # when it went out
    round_ms: float  # send to reply
    cloud_ms: float  # the middle part's forward, as the cloud measured it
    device_ms: float  # the device's own compute for this round (drafting excluded)
    accepted: int = 0  # draft tokens accepted (decode rounds)
    drafted: int = 0  # draft tokens verified (speculative rounds)
    draft_ms: float = 0.0  # drafting before the send (speculative rounds)
    predraft_reused: int = 0  # tokens drafted while this round was in flight and kept for the next
    in_cloud_ms: float = 0.0  # arrival at the cloud to its reply (queueing and the batch's forward)
    batch_sessions: int = 0  # sessions in the cloud batch that ran it (1: the forward was its alone)


@dataclass(slots=True)
class ExperimentRecord:
    system: str  # which system of the scenario served it
    request: int  # index in the workload
    device: int  # emulated device that ran it
    device_class: str  # its class (and so its compute speed)
    arrival_s: float  # from the run's start
    started_s: float  # when its device began it (a device runs one request at a time)
    finished_s: float  # when it ended
    prompt_tokens: int
    new_tokens: int  # generated
    ttft_ms: float  # arrival to the first token (waiting for a busy device included)
    generation_ttft_ms: float  # start of the generation to the first token
    tbt_ms: list[float] = field(default_factory=list)  # between consecutive tokens
    accept_len: float = 1.0  # tokens per decode round (1 without speculation)
    bytes_up: int = 0
    bytes_down: int = 0
    chunks: list[int] = field(default_factory=list)  # prompt chunk sizes as sent
    timeline: list[TimelineStep] = field(default_factory=list)
    error: str = ""  # why it failed ("" = it completed)
    output_ids: list[int] = field(default_factory=list)  # the generated ids (lossless systems agree on them)
    category: str = ""  # the prompt's category in a real prompt set (conversation, code, summarization); "" else

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ExperimentRecord":
        data = dict(data)
        data["timeline"] = [TimelineStep(**step) for step in data.get("timeline", [])]
        return cls(**data)

    def meets(self, ttft_slo_ms: float, tbt_slo_ms: float) -> bool:
        """Both targets: time to first token, and the mean time between tokens."""
        mean_tbt = statistics.fmean(self.tbt_ms) if self.tbt_ms else 0.0
        return not self.error and self.ttft_ms <= ttft_slo_ms and mean_tbt <= tbt_slo_ms


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class SystemSummary:
    system: str
    requests: int  # in the workload
    completed: int
    ttft_ms: tuple[float, float, float]  # p50, p90, p99 over completed requests
    tbt_ms: tuple[float, float, float]  # p50, p90, p99 of completed requests' mean time between tokens (HAT's TBT;
    # pooled token intervals of speculative decoding are mostly ~0, several tokens arriving at once)
    accept_len: float  # mean over completed requests
    tokens_per_s: float  # generated tokens / (last finish - first arrival)
    slo_attainment: float  # fraction of all requests meeting both targets
    bytes_per_request: float  # data-plane bytes, both directions, mean

    @classmethod
    def of(cls, system: str, records: list[ExperimentRecord], ttft_slo_ms: float, tbt_slo_ms: float) -> "SystemSummary":
        done = [r for r in records if not r.error]
        ttfts = [r.ttft_ms for r in done]
        tbts = [statistics.fmean(r.tbt_ms) for r in done if r.tbt_ms]
        span = (max(r.finished_s for r in done) - min(r.arrival_s for r in records)) if done else 0.0
        return cls(system, len(records), len(done), tuple(percentile(ttfts, q) for q in (50, 90, 99)),
                   tuple(percentile(tbts, q) for q in (50, 90, 99)),
                   statistics.fmean(r.accept_len for r in done) if done else float("nan"),
                   sum(r.new_tokens for r in done) / span if span > 0 else float("nan"),
                   sum(r.meets(ttft_slo_ms, tbt_slo_ms) for r in records) / len(records) if records else float("nan"),
                   statistics.fmean(r.bytes_up + r.bytes_down for r in done) if done else float("nan"))
