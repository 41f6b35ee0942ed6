"""The cost model of a pipelined prefill, and its simulation for a given cut of the prompt into chunks.

Five stages, each a FIFO: the device's input part, the uplink, the cloud's middle part, the downlink,
and the device's output part. A pipeline-parallel cloud is `cloud_stages` FIFOs in a row, each taking
an even share of a chunk's middle-part time: chunk i + 1 enters stage 0 as chunk i moves on. The device is one processor for both of its parts and follows the
executor's (`hat.device.prefill`) policy exactly: it computes and sends the chunks in order; before
each chunk it waits for the oldest reply when `max_in_flight` chunks are out, then runs the output part
over every reply that has arrived; once all are sent it takes the remaining replies in order. The time to
the first token is when the last chunk's output part is done, plus the head and sampling, plus what the model
has been seen to leave out (per prompt, and per chunk after the first: `MispredictionModel`). When the device and
the cloud share cores (`shared_compute`), their compute takes turns on one processor.

`prefill_lower_bound` is the bound no cut can beat: the busiest resource's total work plus the
latency every byte pays once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .cost_fit import LinearCost
from .local_cost import LocalCost


@dataclass(frozen=True, slots=True)
class PipelineCosts:
    device_input: LinearCost | LocalCost  # the input part (and the draft adapter's cache) over one chunk
    device_output: LinearCost | LocalCost  # the output part over one reply
    cloud: LinearCost | LocalCost  # the middle part over one chunk, as the cloud predicts it
    cloud_queue_s: float  # wait before the cloud starts a chunk (other devices' work)
    uplink_bytes_per_s: float  # device -> cloud rate
    downlink_bytes_per_s: float  # cloud -> device rate
    rtt_s: float  # round-trip latency of a tiny message (propagation and per-message overheads)
    up_bytes_per_token: float  # hidden-state bytes sent per prompt position
    down_bytes_per_token: float  # bytes returned per position (0 when only the last position comes back)
    message_bytes: float = 64.0  # bytes of a message besides its tensor (header)
    final_s: float = 0.0  # head and sampling of the first token after the last chunk
    cloud_stages: int = 1  # stages of the cloud's pipeline-parallel middle part (as it publishes)
    shared_compute: bool = False  # the device and the cloud compute on the same cores: their compute never overlaps
    chunk_overhead_s: float = 0.0  # time per chunk after a prompt's first that the fitted parts leave out, added to
    # the time to the first token as it was learned (from mispredictions: per-message costs, and on shared cores the
    # device's and the cloud's compute contending); as device time it was hidden wherever the device was not the
    # bottleneck, and a cut into many chunks stayed predicted faster than it ran
    prompt_overhead_s: float = 0.0  # time per prompt the model leaves out (learned from mispredictions)

    def up_s(self, tokens: int) -> float:
        return (self.message_bytes + self.up_bytes_per_token * tokens) / self.uplink_bytes_per_s

    def down_s(self, tokens: int) -> float:
        if not self.down_bytes_per_token:  # only the last position comes back
            return (self.message_bytes + self.up_bytes_per_token) / self.downlink_bytes_per_s
        return (self.message_bytes + self.down_bytes_per_token * tokens) / self.downlink_bytes_per_s


@dataclass(frozen=True, slots=True)
class SimulatedPrefill:
    ttft_s: float  # predicted time from the start of the prefill to the first token
    sent_s: tuple[float, ...]  # per chunk: when the device hands it to the link
    done_s: tuple[float, ...]  # per chunk: when the device has run the output part over its reply


def simulate_prefill(sizes: list[int], costs: PipelineCosts, max_in_flight: int, start: int = 0,
                     in_flight: tuple[int, ...] = (), give_up_after: float = math.inf) -> SimulatedPrefill:
    """Predicted timeline of sending `sizes` chunks, the first at prompt position `start`, from time 0.
    `in_flight`: sizes of the chunks just before `start` that are sent and not yet answered (a re-plan in the middle
    of a prompt): they hold the link and the cloud at time 0 and count towards `max_in_flight`.
    With `shared_compute` the device's and the cloud's compute take turns on one processor (in the order the
    simulation meets them), so a pipeline gains only what the link's time hides.
    `give_up_after`: once the device's time or a reply's arrival passes it (the planner's best so far, less the final
    step), the cut cannot win: the simulation stops and returns a time to the first token of infinity (the planner
    simulates about 50 cuts of a 2048-token prompt, most of them far behind the best)."""
    sent_before = len(in_flight)
    sizes = [*in_flight, *sizes]
    positions, position = [], start - sum(in_flight)
    for n in sizes:
        positions.append(position)
        position += n
    count = len(sizes)
    received = [0.0] * count  # when each reply reaches the device
    done = [0.0] * count
    sent = [0.0] * count
    now = up_free = down_free = 0.0
    stage_free = [0.0] * costs.cloud_stages
    half_rtt = costs.rtt_s / 2
    handled = 0  # replies the device has run the output part over
    later_chunks = count - sent_before - (1 if start == 0 else 0)  # planned chunks after the prompt's first
    # after the last output part: no cut finishes before now + this
    tail_s = costs.final_s + costs.prompt_overhead_s + costs.chunk_overhead_s * later_chunks
    host_free = 0.0  # with shared_compute: when the one processor is free

    def compute(at: float, seconds: float) -> float:
        """The end of `seconds` of compute that may start at `at`."""
        nonlocal host_free
        if not costs.shared_compute:
            return at + seconds
        host_free = max(at, host_free) + seconds
        return host_free

    def handle(i: int, at: float) -> float:
        end = compute(max(at, received[i]), costs.device_output.predict(sizes[i], positions[i]))
        done[i] = end
        return end

    for i, n in enumerate(sizes):
        if i - handled >= max_in_flight:
            now = handle(handled, now)
            handled += 1
        while handled < i and received[handled] <= now:  # replies that came while it computed or waited
            now = handle(handled, now)
            handled += 1
        if i >= sent_before:
            now = compute(now, costs.device_input.predict(n, positions[i]))
        sent[i] = now
        up_free = max(now, up_free) + costs.up_s(n)
        at = max(up_free + half_rtt, stage_free[0]) + costs.cloud_queue_s
        share = costs.cloud.predict(n, positions[i]) / costs.cloud_stages
        for k in range(costs.cloud_stages):
            at = stage_free[k] = compute(max(at, stage_free[k]), share)
        down_free = max(at, down_free) + costs.down_s(n)
        received[i] = down_free + half_rtt
        if max(now, received[i]) + tail_s > give_up_after:  # the device handles this reply: no sooner than that
            return SimulatedPrefill(math.inf, (), ())
    while handled < count:
        now = handle(handled, now)
        handled += 1
    return SimulatedPrefill(now + tail_s, tuple(sent[sent_before:]),
                            tuple(done[sent_before:]))


def prefill_lower_bound(tokens: int, costs: PipelineCosts, start: int = 0) -> float:
    """No cut of `tokens` positions finishes sooner: the busiest resource's work over the whole prompt (per-chunk
    fixed costs left out, as if chunks were free; a pipelined cloud's busiest stage), plus one round trip for the link and the cloud (the device
    can work on other chunks while the last one travels), plus the final step."""
    def work(cost: LinearCost) -> float:
        return cost.predict(tokens, start) - cost.base_s

    device = work(costs.device_input) + work(costs.device_output)
    up = costs.up_bytes_per_token * tokens / costs.uplink_bytes_per_s
    down = costs.down_bytes_per_token * tokens / costs.downlink_bytes_per_s
    cloud = work(costs.cloud) / costs.cloud_stages  # the busiest stage's share
    if costs.shared_compute:  # one processor does all of the compute
        device += work(costs.cloud)
    return max(device, max(up, cloud, down) + costs.rtt_s) + costs.final_s
