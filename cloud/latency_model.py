"""The cloud's latency predictor: its middle part's forward cost fitted from its own timings.

Seeded at start-up by a few forwards on a scratch cache (`profile`), then kept current with every
batch the data plane runs. Devices fetch it over the control plane (`Latency`) to plan prompt chunks.
"""
from __future__ import annotations

import threading
import time

import torch

from hat.common.cost_fit import CLOUD_PROFILE_SHAPES, CostFit, LinearCost, attended
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart
from hat.common.proto import hat_pb2 as pb



class CloudLatencyModel:
    def __init__(self, window: int = 256):
        self._fit = CostFit(window)
        self._lock = threading.Lock()  # the data plane adds, the control plane reads
        self.profiled_samples = 0  # timings from the start-up profile (the rest come from served batches)
        self.stages = 1  # processes the middle part is pipelined over (published for the devices' planners)

    def add_batch(self, spans: list[tuple[int, int]], seconds: float) -> None:
        """One forward over sequences of (tokens, start)."""
        with self._lock:
            self._fit.add(sum(n for n, _ in spans), sum(attended(n, s) for n, s in spans), seconds)

    @property
    def cost(self) -> LinearCost:
        with self._lock:
            return self._fit.cost

    def reply(self, pending_tokens: int, pending_attended: float) -> pb.LatencyReply:
        """The predictor as published; queueing = the predicted time of the work waiting now."""
        with self._lock:
            cost, samples = self._fit.cost, len(self._fit)
        queue_s = cost.batch(pending_tokens, pending_attended) if pending_tokens else 0.0
        return pb.LatencyReply(base_us=cost.base_s * 1e6, per_token_us=cost.per_token_s * 1e6,
                               per_token_context_ns=cost.per_attended_s * 1e9, queue_us=queue_s * 1e6,
                               samples=max(0, samples - self.profiled_samples), pipeline_stages=self.stages)

    @torch.inference_mode()
    def profile(self, part: ModelPart, repeats: int = 2) -> None:
        """Time a few forwards of `part` on a scratch cache (the first of each shape is a warm-up)."""
        cache = part.new_cache()
        generator = torch.Generator(device="cpu").manual_seed(0)
        for tokens, start in CLOUD_PROFILE_SHAPES:
            if start + tokens > cache.max_length:
                continue
            hidden = torch.randn(start + tokens, part.spec.hidden_size, generator=generator).to(part.dtype)
            hidden = hidden.to(part.device)
            if start:
                part.forward_layers(hidden[:start], [SequenceSpan(cache, 0, start)])
            for attempt in range(repeats + 1):
                began = time.perf_counter()
                part.forward_layers(hidden[start:], [SequenceSpan(cache, start, tokens)])
                if part.device.type == "cuda":
                    torch.cuda.synchronize(part.device)
                if attempt:
                    self.add_batch([(tokens, start)], time.perf_counter() - began)
                    self.profiled_samples += 1
