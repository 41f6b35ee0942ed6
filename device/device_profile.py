"""The device's own compute costs for the chunk planner: fitted from a start-up profile, then kept
current with the timing of every prompt chunk it runs."""
from __future__ import annotations

import statistics
import time

import torch

from hat.common.cost_fit import PROFILE_SHAPES, CostFit, attended
from hat.common.layers import SequenceSpan

from .device_model import DeviceModel

FINAL_REPEATS = 5  # timings of the head whose median is final_s


class DeviceProfile:
    def __init__(self, window: int = 128):
        self.input = CostFit(window)  # input part (and the draft adapter's cache) over one chunk
        self.output = CostFit(window)  # output part over one reply
        self.final_s = 0.0  # head and sampling of the first token (the profile's median)

    def add_input(self, tokens: int, start: int, seconds: float) -> None:
        self.input.add(tokens, attended(tokens, start), seconds)

    def add_output(self, tokens: int, start: int, seconds: float) -> None:
        self.output.add(tokens, attended(tokens, start), seconds)

    @torch.inference_mode()
    def profile(self, model: DeviceModel, with_adapter: bool, repeats: int = 1) -> "DeviceProfile":
        """Time the device's parts on scratch caches over a few chunk shapes (the first run of each is a warm-up)."""
        inp, out = model.input_part, model.output_part
        caches = (inp.new_cache(), out.new_cache(), model.adapter.new_cache() if with_adapter else None)
        vocab = min(model.spec.vocab_size, 1000)
        generator = torch.Generator().manual_seed(0)
        for tokens, start in PROFILE_SHAPES:
            if start + tokens > caches[0].max_length:
                continue
            ids = torch.randint(vocab, (start + tokens,), generator=generator).tolist()
            if start:
                self._run(model, caches, ids[:start], 0)
            for attempt in range(repeats + 1):
                input_s, output_s = self._run(model, caches, ids[start:], start)
                if attempt:
                    self.add_input(tokens, start, input_s)
                    if out.num_layers:
                        self.add_output(tokens, start, output_s)
        last = torch.zeros(1, model.spec.hidden_size, dtype=out.dtype, device=out.device)
        times = []
        for _ in range(FINAL_REPEATS + 1):  # the first is a warm-up
            began = time.perf_counter()
            out.logits(last).argmax()
            times.append(time.perf_counter() - began)
        self.final_s = statistics.median(times[1:])
        return self

    @staticmethod
    def _run(model: DeviceModel, caches, ids: list[int], start: int) -> tuple[float, float]:
        input_cache, output_cache, adapter_cache = caches
        began = time.perf_counter()
        previous = None  # a conditioned adapter's previous middle outputs: zeros cost what real ones do
        if adapter_cache is not None and model.conditioned_adapter:
            previous = torch.zeros(len(ids), model.spec.hidden_size)
        hidden, _ = model.run_input(ids, start, input_cache, adapter_cache, previous)
        middle = time.perf_counter()
        if model.output_part.num_layers:
            model.output_part.forward_layers(hidden, [SequenceSpan(output_cache, start, len(ids))])
        return middle - began, time.perf_counter() - middle
