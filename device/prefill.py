"""Pipelined prefill: the device runs the input part chunk by chunk and sends each chunk as soon as it is
ready, up to `max_in_flight` unanswered; between chunks it runs the output part over the replies that
have come. The cut comes from the ChunkPlanner and the cost model it is given (this device's profile,
the link as measured, the cloud's published predictor); when a measured rate drifts during the prompt,
the rest of the prompt is re-planned.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hat.common import wire
from hat.common.layers import SequenceSpan
from hat.common.local_cost import local_cost
from hat.common.prefill_pipeline import PipelineCosts

from .chunk_planner import ChunkingConfig, ChunkPlan, ChunkPlanner
from .cloud_cost import CloudCostTracker
from .cloud_link import CloudLink
from .device_model import DeviceModel
from .device_profile import DeviceProfile
from .drafter import DeviceCaches
from .link_estimator import LinkEstimator
from .misprediction import MispredictionModel
from .results import StepTiming, in_cloud_ms

HEADER_BYTES = 64.0  # a FORWARD's or RESULT's bytes besides its tensor, near enough
LOOPBACK_BYTES_PER_S = 1e9  # least rate of a loopback link on shared cores (a memory copy; any machine is faster)


@dataclass(slots=True)
class PrefillReport:
    """What a prefill did, for the generation's result."""
    chunks: list[int] = field(default_factory=list)  # chunk sizes as sent, in order
    predicted_s: float = 0.0  # the first plan's predicted time from the prefill's start to the first token
    replans: int = 0  # times the rest of the prompt was re-planned
    plan_ms: float = 0.0  # time spent planning
    last_middle: torch.Tensor | None = None  # the middle part's output of the last prompt position as the cloud sent
    # it, [1, width] (a verified-conditioned adapter's feature for the first drafted round)


@dataclass(slots=True)
class _Chunk:
    sequence: int  # the FORWARD's sequence number
    start: int  # first prompt position
    count: int  # positions
    up_bytes: int  # bytes of the FORWARD on the wire
    input_s: float  # device time of the input part over it
    computes_at_send: int  # the device's prefill computes (input or output part runs) when it was sent
    token_ids: list[int] | None = None  # a conditioned adapter's chunk: its tokens, run through the adapter on reply
    hidden: torch.Tensor | None = None  # and their input-part output


class PrefillPipeline:
    def __init__(self, model: DeviceModel, link: CloudLink, config: ChunkingConfig, profile: DeviceProfile,
                 estimator: LinkEstimator):
        self.model, self.link = model, link
        self.config = config  # may be replaced between prompts
        self.profile, self.estimator = profile, estimator
        self.cloud = CloudCostTracker(link)
        self.misprediction = MispredictionModel()  # what the cost model left out of the prompts so far
        self._open_sequence: int | None = None  # the session's OPEN while its reply has not been taken
        self._computes = 0  # input or output part runs so far (on shared cores: a chunk out during one shared them)
        spec = model.spec
        self.up_bytes_per_token = spec.hidden_size * model.input_part.dtype.itemsize
        self.down_bytes_per_token = self.up_bytes_per_token if model.output_part.num_layers else 0.0

    def costs(self) -> PipelineCosts:
        link = self.estimator.estimate
        shared = self.shared_compute()
        if shared:  # loopback: the estimates measure the cloud's late stamps on busy cores, not a link to hide
            link = dataclasses.replace(link, uplink_bytes_per_s=max(link.uplink_bytes_per_s, LOOPBACK_BYTES_PER_S),
                                       downlink_bytes_per_s=max(link.downlink_bytes_per_s, LOOPBACK_BYTES_PER_S))
        cloud, queue_s = self.cloud.cost(own=shared)
        return PipelineCosts(device_input=local_cost(self.profile.input), device_output=local_cost(self.profile.output),
                             cloud=cloud, cloud_queue_s=queue_s, uplink_bytes_per_s=link.uplink_bytes_per_s,
                             downlink_bytes_per_s=link.downlink_bytes_per_s, rtt_s=link.rtt_s,
                             up_bytes_per_token=self.up_bytes_per_token, down_bytes_per_token=self.down_bytes_per_token,
                             message_bytes=HEADER_BYTES, final_s=self.profile.final_s,
                             cloud_stages=self.cloud.stages(), shared_compute=shared,
                             chunk_overhead_s=self.misprediction.per_chunk_s,
                             prompt_overhead_s=self.misprediction.per_prompt_s)

    def shared_compute(self) -> bool:
        """Whether the device and the cloud compute on the same cores (`ChunkingConfig.shared_host`, or guessed:
        a cloud on loopback, and a device that may use every core of the machine with a thread each, as torch does
        by default; a device pinned to some cores or given fewer threads has left the others to the cloud)."""
        if self.config.shared_host is not None:
            return self.config.shared_host
        return _is_loopback(self.link.config.host) and _uses_every_core()

    def _plan(self, tokens: int, start: int, max_chunk: int, report: PrefillReport,
              sizes: tuple[int, ...] | None = None, in_flight: tuple[int, ...] = ()) -> tuple[ChunkPlan, tuple]:
        began = time.perf_counter()
        planner = ChunkPlanner(self.config)
        plan = planner.plan(tokens, self.costs(), max_chunk, start, in_flight) if sizes is None else \
            planner.evaluate(list(sizes), self.costs(), start)
        report.plan_ms += (time.perf_counter() - began) * 1000
        return plan, self._rates(max(plan.sizes))

    def _rates(self, chunk: int) -> tuple[int, float, float, float, float]:
        """What a plan of chunks up to `chunk` tokens depends on and may drift: the link's rates, the cloud's cost of
        such a chunk as the planner sees it (its cost model, anchored at the sizes timed: the raw moving ratio to the
        published line moved 30% on one outlier chunk, and re-planned prompts for nothing), the device's per-token
        cost. The size comes first, to measure the same thing again."""
        link = self.estimator.estimate
        cloud, _ = self.cloud.cost(own=self.shared_compute())
        return (chunk, link.uplink_bytes_per_s, link.downlink_bytes_per_s, cloud.predict(chunk) or 1.0,
                self.profile.input.cost.predict(128) or 1.0)

    def _drifted(self, reference: tuple[int, float, float, float, float]) -> bool:
        now = self._rates(reference[0])
        return any(abs(value / then - 1) > self.config.replan_drift for value, then in zip(now[1:], reference[1:])
                   if then)

    def run(self, session_id: str, token_ids: list[int], caches: DeviceCaches, max_chunk: int,
            steps: list[StepTiming], open_sequence: int | None = None,
            sizes: tuple[int, ...] | None = None) -> tuple[torch.Tensor, PrefillReport]:
        """Prefill positions [0, len(token_ids)); returns the middle part's output of the last position (as the
        output part left it: ready for the head) and the report. Device caches are written from position 0.
        `open_sequence`: the session's OPEN, sent and not yet answered (its reply comes before any chunk's).
        `sizes`: this cut instead of the configured mode's (the probe's)."""
        model, report = self.model, PrefillReport()
        self._open_sequence = open_sequence
        total = len(token_ids)
        self.cloud.refresh()
        prefill_began = time.perf_counter()
        shared = self.shared_compute()
        plan, reference = self._plan(total, 0, max_chunk, report, sizes)
        report.predicted_s = plan.predicted_s + report.plan_ms / 1000
        queue, position = deque(plan.sizes), 0
        in_flight: deque[_Chunk] = deque()
        last = None
        # a conditioned adapter (speculation) runs over each chunk when its reply brings the middle outputs before
        # its positions: every position's middle output comes back then, output layers or not
        self._conditioned = caches.adapter is not None and model.conditioned_adapter
        self._previous = None  # the middle output of the position before the next chunk to complete (conditioned)
        self._last_middle = None  # the middle output of the last position completed
        return_last = 0 if self.down_bytes_per_token or self._conditioned else 1
        try:
            while position < total:
                if len(in_flight) >= self.config.max_in_flight:
                    last = self._complete_oldest(in_flight, caches, steps, shared)
                while in_flight and self.link.reply_ready():  # replies that came while the last chunk was computed
                    if self._open_sequence is not None:
                        self._take_opened()
                    else:
                        last = self._complete_oldest(in_flight, caches, steps, shared)
                if queue and sizes is None and self.config.mode == "adaptive" and self._drifted(reference):
                    plan, reference = self._plan(total - position, position, max_chunk, report,
                                                 in_flight=tuple(c.count for c in in_flight))
                    queue = deque(plan.sizes)
                    report.replans += 1
                count = min(queue.popleft() if queue else max_chunk, total - position, max_chunk)
                began = time.perf_counter()
                hidden, _ = model.run_input(token_ids[position:position + count], position, caches.input,
                                            None if self._conditioned else caches.adapter)
                input_s = time.perf_counter() - began
                self._computes += 1
                up0 = self.link.bytes_up
                sequence = self.link.send_forward(session_id, position, hidden, return_last, append_only=True)
                in_flight.append(_Chunk(sequence, position, count, self.link.bytes_up - up0, input_s, self._computes,
                                        *((token_ids[position:position + count], hidden) if self._conditioned else ())))
                if not (shared and len(in_flight) > 1):  # shared cores and a chunk in the cloud: no solo timing
                    self.profile.add_input(count, position, input_s)
                report.chunks.append(count)
                position += count
            while in_flight:
                last = self._complete_oldest(in_flight, caches, steps, shared)
            self._learn(report, time.perf_counter() - prefill_began)
            report.last_middle = self._last_middle
        finally:
            for chunk in in_flight:  # given up on (an error): their replies, if any come, are dropped
                self.link.forget(chunk.sequence)
            if self._open_sequence is not None:
                self.link.forget(self._open_sequence)
        return last, report

    def _learn(self, report: PrefillReport, measured_s: float) -> None:
        """Teach the misprediction model what this prompt took beyond the model's prediction for its cut, the
        costs as they stand after it (every stage's fit has its timings now)."""
        costs = self.costs()
        predicted = ChunkPlanner(self.config).evaluate(report.chunks, costs, 0).predicted_s - costs.final_s
        self.misprediction.add(len(report.chunks), measured_s, predicted + report.plan_ms / 1000)

    def _take_opened(self) -> None:
        """The OPENED reply, which comes before any chunk's: a refused OPEN is the error to report."""
        sequence, self._open_sequence = self._open_sequence, None
        self.estimator.on_open(self.link.receive(sequence))

    def _complete_oldest(self, in_flight: deque, caches: DeviceCaches, steps: list[StepTiming],
                         shared: bool) -> torch.Tensor:
        """Wait for the oldest chunk's reply and run the output part over it; returns the middle output of its last
        position. On shared cores a timing is kept only where nothing else computed beside it: the cloud's when the
        device computed nothing while the chunk was out, the output part's when no chunk behind it is in the cloud."""
        chunk = in_flight.popleft()
        if self._open_sequence is not None:
            self._take_opened()
        reply = self.link.receive(chunk.sequence)
        self.estimator.on_reply(reply, chunk.up_bytes, _reply_bytes(reply))
        header = reply.header
        if not shared or self._computes == chunk.computes_at_send:
            self.cloud.observe(chunk.count, chunk.start, header.compute_us / 1e6, header.batch_sessions)
        middle = reply.tensor
        self._last_middle = middle[-1:]
        if chunk.token_ids is not None:  # conditioned adapter: its features are the middle outputs one position back
            before = middle.new_zeros(1, middle.shape[1]) if self._previous is None else self._previous
            self.model.run_adapter(chunk.token_ids, chunk.hidden, chunk.start, caches.adapter,
                                   torch.cat([before, middle[:-1]]))
            self._previous = middle[-1:]
        output_s = 0.0
        if self.down_bytes_per_token:
            began = time.perf_counter()
            middle = self.model.output_part.forward_layers(middle, [SequenceSpan(caches.output, chunk.start,
                                                                                 chunk.count)])
            output_s = time.perf_counter() - began
            self._computes += 1
            if not (shared and in_flight):
                self.profile.add_output(chunk.count, chunk.start, output_s)
        steps.append(StepTiming(chunk.count, (chunk.input_s + output_s) * 1000,
                                (reply.received_s - reply.request_sent_s) * 1000, header.compute_us / 1000,
                                sent_s=reply.request_sent_s, in_cloud_ms=in_cloud_ms(header),
                                batch_sessions=header.batch_sessions))
        return middle[-1:]


def _reply_bytes(reply: wire.DataMessage) -> int:
    tensor = reply.tensor
    return reply.header.ByteSize() + (tensor.numel() * tensor.element_size() if tensor is not None else 0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uses_every_core() -> bool:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores >= (os.cpu_count() or 1) and torch.get_num_threads() >= cores
