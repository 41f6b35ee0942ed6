"""Simulator costs from public hardware figures: a model of any shape on GPUs this machine does not have.

A scenario's `hardware` section names a model shape (a preset such as vicuna-7b, or a config folder),
the cloud's accelerator and how many GPUs its middle part is spread over, and the speculation model.
Every forward is a roofline (testbed.roofline: spec-sheet FLOP/s and bandwidth, assumed efficiencies):
the cloud's middle part per batch, each device class's input part, output part, head and draft
adapter (the class's Jetson of the same name). What the devices and the cloud's scheduler plan with
is the LinearCost a start-up profile would fit to those timings, as on real hardware.
"""
from __future__ import annotations

from dataclasses import dataclass

from hat.common.cost_fit import LinearCost
from hat.device.speculation import DEFAULT_SPECULATION

from .cloud_only_config import CloudOnlyConfig
from .device_profiles import DEVICE_CLASSES
from .roofline import ACCELERATORS, RooflineCost, describe, fit_linear, model_shape
from .sim_costs import BATCH_TOKENS, DEFAULT_TBT_SLO_S, HEADER_BYTES, DeviceCosts, SpeculationModel, SystemCosts
from .systems import SYSTEMS


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    model: str  # a preset of hat.testbed.roofline.MODEL_SHAPES (vicuna-7b, llama-13b, ...) or a config folder
    cloud: str = "a6000"  # the cloud's accelerator (a key of hat.testbed.roofline.ACCELERATORS)
    cloud_gpus: int = 1  # GPUs the middle part is spread over (tensor parallel)
    adapter_layers: int = 1  # decoder layers of the device's draft adapter
    acceptance_rate: float = 0.7  # probability each drafted token is accepted (geometric model)
    draft_tokens: int = 4  # tokens drafted per verification round
    overhead_ms: float = 1.0  # per round trip beyond link and compute (sockets, serialisation, framework)
    kv_fraction: float = 0.9  # share of the cloud's memory left after the weights that holds KV

    def __post_init__(self):
        if self.cloud not in ACCELERATORS:
            raise ValueError(f"hardware.cloud: {self.cloud!r}; known: {', '.join(ACCELERATORS)}")
        if self.cloud_gpus < 1 or self.adapter_layers < 0 or self.draft_tokens < 1:
            raise ValueError("hardware: cloud_gpus >= 1, adapter_layers >= 0 and draft_tokens >= 1")
        if not 0 <= self.acceptance_rate <= 1 or not 0 < self.kv_fraction <= 1 or self.overhead_ms < 0:
            raise ValueError("hardware: acceptance_rate in [0, 1], kv_fraction in (0, 1], overhead_ms >= 0")
        model_shape(self.model)  # an unknown model is refused when the scenario is read


def _line(cost: RooflineCost, tokens: range) -> LinearCost:
    """A line through a roofline's times at the ends of `tokens` (decode rounds: a few positions each)."""
    low, high = tokens.start, tokens.stop - 1
    a, b = cost.predict(low), cost.predict(high)
    slope = (b - a) / (high - low)
    return LinearCost(a - slope * low, slope, 0.0)


def _device(shape, accelerator, input_layers: int, output_layers: int, hw: HardwareSpec,
            speculation: bool) -> DeviceCosts:
    adapter_params = 3 * shape.hidden * shape.hidden  # fuse (2h -> h) and project (h -> h)
    chunk_layers = input_layers + (hw.adapter_layers if speculation else 0)  # prefill fills the adapter's cache too
    inp = RooflineCost(shape, accelerator, chunk_layers, embedding=True,
                       extra_params=adapter_params if speculation else 0)
    out = RooflineCost(shape, accelerator, output_layers)
    head = RooflineCost(shape, accelerator, 0, head=True)
    final_s = head.predict(1)
    if speculation:
        one_input = RooflineCost(shape, accelerator, input_layers, embedding=True).predict(1)
        adapter = RooflineCost(shape, accelerator, hw.adapter_layers, extra_params=adapter_params).predict(1)
        draft_token_s = one_input + adapter + out.predict(1) + final_s
        before = LinearCost(0.0, draft_token_s, 0.0)
        verify = RooflineCost(shape, accelerator, output_layers, head=True)
        after = _line(verify, range(1, hw.draft_tokens + 2))
    else:
        draft_token_s = 0.0
        before = LinearCost(inp.predict(1), 0.0, 0.0)
        after = LinearCost(out.predict(1) + final_s, 0.0, 0.0)
    return DeviceCosts(inp, out, final_s, before, after, fit_linear(inp), fit_linear(out), draft_token_s)


def roofline_costs(hw: HardwareSpec, input_layers: int, output_layers: int,
                   systems: tuple[str, ...]) -> dict[str, SystemCosts]:
    shape = model_shape(hw.model)
    middle_layers = shape.layers - input_layers - output_layers
    if middle_layers < 1:
        raise ValueError(f"{shape.name} has {shape.layers} layers: the split leaves none for the cloud")
    accelerator = ACCELERATORS[hw.cloud]
    middle = RooflineCost(shape, accelerator, middle_layers, parallel=hw.cloud_gpus)
    whole = RooflineCost(shape, accelerator, shape.layers, embedding=True, head=True, parallel=hw.cloud_gpus)
    speculation = SpeculationModel.geometric(hw.acceptance_rate, hw.draft_tokens, DEFAULT_SPECULATION.max_predraft)
    token_bytes = shape.hidden * shape.bytes_per_param
    out = {}
    for name in systems:
        system = SYSTEMS[name]
        cloud = whole if system.cloud_only else middle
        room = accelerator.memory_bytes * hw.cloud_gpus - cloud.weight_bytes()
        if room <= 0:
            raise ValueError(f"{shape.name}'s {'whole model' if system.cloud_only else 'middle part'} does not fit "
                             f"{hw.cloud_gpus} x {accelerator.name}")
        notes = (f"roofline costs: {shape.name}, cloud {hw.cloud_gpus} x {describe(accelerator)}",
                 *(describe(ACCELERATORS[c]) for c in DEVICE_CLASSES),
                 f"speculation: {speculation.source}; {hw.overhead_ms:g} ms per round trip beyond link and compute")
        devices = {} if system.cloud_only else {
            c: _device(shape, ACCELERATORS[c], input_layers, output_layers, hw, system.speculation)
            for c in DEVICE_CLASSES}
        out[name] = SystemCosts(
            devices, cloud, fit_linear(cloud), hw.overhead_ms / 1000,
            speculation if system.speculation else None,
            4.0 if system.cloud_only else token_bytes, 4.0 if system.cloud_only else (
                token_bytes if output_layers else 0.0), HEADER_BYTES,
            max_batch_tokens=CloudOnlyConfig().token_budget if system.cloud_only else BATCH_TOKENS,
            kv_positions=int(room * hw.kv_fraction / cloud.kv_bytes_per_position()), tbt_slo_s=DEFAULT_TBT_SLO_S,
            cloud_tokens=system.cloud_only, notes=notes)
    return out
