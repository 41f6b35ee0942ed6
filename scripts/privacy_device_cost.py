"""What each split point K costs the device per generated token, measured beside the privacy probe's figures.

A device with `--input-layers K --output-layers M` runs, per decode step, its input part (the embedding and layers
[0, K)) and its output part (layers [N-M, N), the final norm and the LM head) on one token with a KV cache of
`past` positions. This times both with the project's runtime (hat.common.model_part, float32, the thread count the
caller set) and, as the baseline in the same run, the whole model's decode step (what a device running the model
alone would pay). The steps are interleaved round-robin (every K, the output part and the whole model once per
round), so a busy machine slows them alike; medians of `rounds`. The absolute times carry whatever load the
machine has; the share of the whole model's step is the figure to compare.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch


@dataclass(frozen=True, slots=True)
class CostSettings:
    output_layers: int = 1  # M: layers the device runs after the cloud (the project's default split)
    past: int = 256  # positions already in the caches when a step is timed
    rounds: int = 40  # timed steps per part (medians), after `warmup` untimed ones
    warmup: int = 5  # untimed steps per part first


def _step_timer(part, hidden_input: bool, past: int, seed: int) -> Callable[[], float]:
    """A function that runs `part` on one new token at position `past` (its cache holding `past` positions, cut
    back to them each call) and returns the seconds it took, the LM head included when the part has one."""
    from hat.common.layers import SequenceSpan

    generator = torch.Generator().manual_seed(seed)
    spec = part.spec
    cache = part.new_cache(past + 1, preallocate=True)
    with torch.no_grad():
        if hidden_input:
            prefix = torch.randn(past, spec.hidden_size, generator=generator)
            part.forward_layers(prefix, [SequenceSpan(cache, 0, past)])
        else:
            ids = torch.randint(0, spec.vocab_size, (past,), generator=generator)
            part.forward_layers(part.embed(ids), [SequenceSpan(cache, 0, past)])
    token = torch.randint(0, spec.vocab_size, (1,), generator=generator)
    hidden = torch.randn(1, spec.hidden_size, generator=generator)

    @torch.no_grad()
    def step() -> float:
        started = time.perf_counter()
        x = hidden if hidden_input else part.embed(token)
        out = part.forward_layers(x, [SequenceSpan(cache, past, 1)])
        if part.has_head:
            part.logits(out)
        return time.perf_counter() - started
    return step


def device_step_times(model_dir: str | Path, input_layers: Sequence[int], settings: CostSettings = CostSettings(),
                      progress: Callable[[str], None] | None = None) -> dict:
    """{"whole_ms", "output_ms", "rows": [{"input_layers", "input_ms", "output_ms", "device_ms", "share"}], settings}:
    median milliseconds per decode step of each K's input part, the output part (M layers and the head), their sum
    (the device's time per token at K) and that sum's share of the whole model's step measured in the same rounds."""
    from hat.common.checkpoint import load_tensors
    from hat.common.model_part import ModelPart
    from hat.common.model_spec import load_model_spec

    spec = load_model_spec(model_dir)
    n, m = spec.num_layers, settings.output_layers
    if any(k < 1 or k + m >= n for k in input_layers):
        raise ValueError(f"K must lie in [1, {n - m}) with M={m} on a {n}-layer model (the cloud runs one layer or "
                         f"more): got {list(input_layers)}")
    tensors = load_tensors(model_dir, lambda name: True, torch.float32)
    timers = {("input", k): _step_timer(ModelPart.from_tensors(spec, 0, k, tensors, embedding=True), False,
                                        settings.past, k) for k in input_layers}
    timers["output", m] = _step_timer(ModelPart.from_tensors(spec, n - m, n, tensors, head=True), True, settings.past, -1)
    timers["whole", n] = _step_timer(ModelPart.from_tensors(spec, 0, n, tensors, embedding=True, head=True), False,
                                     settings.past, -2)
    del tensors
    samples: dict = {key: [] for key in timers}
    for round_ in range(settings.warmup + settings.rounds):
        for key, step in timers.items():
            seconds = step()
            if round_ >= settings.warmup:
                samples[key].append(seconds)
        if progress and round_ % 10 == 9:
            progress(f"device step times: round {round_ + 1} of {settings.warmup + settings.rounds}")
    ms = {key: 1000 * statistics.median(values) for key, values in samples.items()}
    whole, output = ms["whole", n], ms["output", m]
    rows = [{"input_layers": k, "input_ms": ms["input", k], "output_ms": output, "device_ms": ms["input", k] + output,
             "share": (ms["input", k] + output) / whole} for k in input_layers]
    return {"whole_ms": whole, "output_ms": output, "output_layers": m, "num_layers": n, "past": settings.past,
            "rounds": settings.rounds, "threads": torch.get_num_threads(), "rows": rows}
