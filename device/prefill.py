"""Pipelined prefill: the device runs the input part chunk by chunk and sends each chunk as soon as it is
ready, up to `max_in_flight` unanswered; between chunks it runs the output part over the replies that
have come. The cut comes from the ChunkPlanner and the cost model it is given (this device's profile,
the link as measured, the cloud's published predictor); when a measured rate drifts during the prompt,
the rest of the prompt is re-planned.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hat.common import wire
from hat.common.layers import SequenceSpan
from hat.common.prefill_pipeline import PipelineCosts

from .chunk_planner import ChunkingConfig, ChunkPlan, ChunkPlanner
from .cloud_cost import CloudCostTracker
from .cloud_link import CloudLink
from .device_model import DeviceModel
from .device_profile import DeviceProfile
from .drafter import DeviceCaches
from .link_estimator import LinkEstimator
from .results import StepTiming, in_cloud_ms

HEADER_BYTES = 64.0  # a FORWARD's or RESULT's bytes besides its tensor, near enough


@dataclass(slots=True)
class PrefillReport:
    """What a prefill did, for the generation's result."""
    chunks: list[int] = field(default_factory=list)  # chunk sizes as sent, in order
    predicted_s: float = 0.0  # the first plan's predicted time from the prefill's start to the first token
    replans: int = 0  # times the rest of the prompt was re-planned
    plan_ms: float = 0.0  # time spent planning


@dataclass(slots=True)
class _Chunk:
    sequence: int  # the FORWARD's sequence number
    start: int  # first prompt position
    count: int  # positions
    up_bytes: int  # bytes of the FORWARD on the wire
    input_s: float  # device time of the input part over it


class PrefillPipeline:
    def __init__(self, model: DeviceModel, link: CloudLink, config: ChunkingConfig, profile: DeviceProfile,
                 estimator: LinkEstimator):
        self.model, self.link = model, link
        self.config = config  # may be replaced between prompts
        self.profile, self.estimator = profile, estimator
        self.cloud = CloudCostTracker(link)
        self._open_sequence: int | None = None  # the session's OPEN while its reply has not been taken
        spec = model.spec
        self.up_bytes_per_token = spec.hidden_size * model.input_part.dtype.itemsize
        self.down_bytes_per_token = self.up_bytes_per_token if model.output_part.num_layers else 0.0

    def costs(self) -> PipelineCosts:
        link = self.estimator.estimate
        cloud, queue_s = self.cloud.cost()
        return PipelineCosts(device_input=self.profile.input.cost, device_output=self.profile.output.cost,
                             cloud=cloud, cloud_queue_s=queue_s, uplink_bytes_per_s=link.uplink_bytes_per_s,
                             downlink_bytes_per_s=link.downlink_bytes_per_s, rtt_s=link.rtt_s,
                             up_bytes_per_token=self.up_bytes_per_token, down_bytes_per_token=self.down_bytes_per_token,
                             message_bytes=HEADER_BYTES, final_s=self.profile.final_s,
                             cloud_stages=self.cloud.stages())

    def _plan(self, tokens: int, start: int, max_chunk: int, report: PrefillReport) -> tuple[ChunkPlan, tuple]:
        began = time.perf_counter()
        plan = ChunkPlanner(self.config).plan(tokens, self.costs(), max_chunk, start)
        report.plan_ms += (time.perf_counter() - began) * 1000
        return plan, self._rates()

    def _rates(self) -> tuple[float, ...]:
        """What a plan depends on and may drift: link rates, the cloud's cost ratio, the device's per-token cost."""
        link = self.estimator.estimate
        return (link.uplink_bytes_per_s, link.downlink_bytes_per_s, self.cloud.ratio,
                self.profile.input.cost.predict(128) or 1.0)

    def _drifted(self, reference: tuple[float, ...]) -> bool:
        return any(abs(now / then - 1) > self.config.replan_drift for now, then in zip(self._rates(), reference) if then)

    def run(self, session_id: str, token_ids: list[int], caches: DeviceCaches, max_chunk: int,
            steps: list[StepTiming], open_sequence: int | None = None) -> tuple[torch.Tensor, PrefillReport]:
        """Prefill positions [0, len(token_ids)); returns the middle part's output of the last position (as the
        output part left it: ready for the head) and the report. Device caches are written from position 0.
        `open_sequence`: the session's OPEN, sent and not yet answered (its reply comes before any chunk's)."""
        model, report = self.model, PrefillReport()
        self._open_sequence = open_sequence
        total = len(token_ids)
        self.cloud.refresh()
        plan, reference = self._plan(total, 0, max_chunk, report)
        report.predicted_s = plan.predicted_s + report.plan_ms / 1000
        queue, position = deque(plan.sizes), 0
        in_flight: deque[_Chunk] = deque()
        last = None
        return_last = 0 if self.down_bytes_per_token else 1
        try:
            while position < total:
                if len(in_flight) >= self.config.max_in_flight:
                    last = self._complete(in_flight.popleft(), caches, steps)
                while in_flight and self.link.reply_ready():  # replies that came while the last chunk was computed
                    if self._open_sequence is not None:
                        self._take_opened()
                    else:
                        last = self._complete(in_flight.popleft(), caches, steps)
                if queue and self.config.mode == "adaptive" and self._drifted(reference):
                    plan, reference = self._plan(total - position, position, max_chunk, report)
                    queue = deque(plan.sizes)
                    report.replans += 1
                count = min(queue.popleft() if queue else max_chunk, total - position, max_chunk)
                began = time.perf_counter()
                hidden, _ = model.run_input(token_ids[position:position + count], position, caches.input,
                                            caches.adapter)
                input_s = time.perf_counter() - began
                up0 = self.link.bytes_up
                sequence = self.link.send_forward(session_id, position, hidden, return_last, append_only=True)
                in_flight.append(_Chunk(sequence, position, count, self.link.bytes_up - up0, input_s))
                self.profile.add_input(count, position, input_s)
                report.chunks.append(count)
                position += count
            while in_flight:
                last = self._complete(in_flight.popleft(), caches, steps)
        finally:
            for chunk in in_flight:  # given up on (an error): their replies, if any come, are dropped
                self.link.forget(chunk.sequence)
            if self._open_sequence is not None:
                self.link.forget(self._open_sequence)
        return last, report

    def _take_opened(self) -> None:
        """The OPENED reply, which comes before any chunk's: a refused OPEN is the error to report."""
        sequence, self._open_sequence = self._open_sequence, None
        self.estimator.on_open(self.link.receive(sequence))

    def _complete(self, chunk: _Chunk, caches: DeviceCaches, steps: list[StepTiming]) -> torch.Tensor:
        """Wait for a chunk's reply and run the output part over it; returns the middle output of its last position."""
        if self._open_sequence is not None:
            self._take_opened()
        reply = self.link.receive(chunk.sequence)
        self.estimator.on_reply(reply, chunk.up_bytes, _reply_bytes(reply))
        header = reply.header
        self.cloud.observe(chunk.count, chunk.start, header.compute_us / 1e6, header.batch_sessions)
        middle = reply.tensor
        output_s = 0.0
        if self.down_bytes_per_token:
            began = time.perf_counter()
            middle = self.model.output_part.forward_layers(middle, [SequenceSpan(caches.output, chunk.start,
                                                                                 chunk.count)])
            output_s = time.perf_counter() - began
            self.profile.add_output(chunk.count, chunk.start, output_s)
        steps.append(StepTiming(chunk.count, (chunk.input_s + output_s) * 1000,
                                (reply.received_s - reply.request_sent_s) * 1000, header.compute_us / 1000,
                                sent_s=reply.request_sent_s, in_cloud_ms=in_cloud_ms(header),
                                batch_sessions=header.batch_sessions))
        return middle[-1:]


def _reply_bytes(reply: wire.DataMessage) -> int:
    tensor = reply.tensor
    return reply.header.ByteSize() + (tensor.numel() * tensor.element_size() if tensor is not None else 0)
