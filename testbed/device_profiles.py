"""How an emulated device computes: this machine's CPU, slowed down to a device class and power mode.

What is emulated: every forward of the device's parts (embedding, input part, draft adapter, output
part, head) runs for real on this machine, then the thread sleeps (slowdown - 1) times the time it
took, so the device's compute takes `slowdown` times as long as here and its outputs are the real
ones. A power-mode schedule changes the slowdown during a run, as HAT switched its Jetsons' modes.

What is not: a device faster than this machine (a slowdown below 1 is refused: a Jetson's GPU may
well beat this CPU on prefill, so "Orin class" here means this CPU's speed, and comparisons between
device classes are relative), the shape of a GPU's cost (a GPU's time grows less with tokens than a
CPU's), memory limits, and energy. The class factors are assumptions from public specifications, not
measurements: Xavier-class devices run 1.5x slower than Orin-class (the ratio of their memory
bandwidths, 204.8 / 136.5 GB/s, which bounds small-batch decoding), and each power mode's factor is the
ratio of the class's top GPU clock to that mode's cap, as we recall NVIDIA's nvpmodel tables (check them
with `nvpmodel -q --verbose` on a device). Replace them with a real Jetson's measurements when one is
at hand.
"""
from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True, slots=True)
class DeviceClass:
    name: str
    slowdown: float  # compute time relative to this machine, in the class's top power mode
    modes: dict[str, float] = field(default_factory=dict)  # power mode -> extra slowdown relative to the top mode

    def factor(self, mode: str) -> float:
        if mode not in self.modes:
            raise ValueError(f"{self.name} has power modes {', '.join(self.modes)}, not {mode!r}")
        return self.slowdown * self.modes[mode]


JETSON_AGX_ORIN = DeviceClass("jetson-agx-orin", 1.0, {"MAXN": 1.0, "50W": 1.57, "30W": 2.08, "15W": 3.10})
JETSON_AGX_XAVIER = DeviceClass("jetson-agx-xavier", 1.5, {"MAXN": 1.0, "30W": 1.06, "15W": 2.06, "10W": 2.65})
DEVICE_CLASSES = {c.name: c for c in (JETSON_AGX_ORIN, JETSON_AGX_XAVIER)}


@dataclass(frozen=True, slots=True)
class PowerSchedule:
    """Power modes over a run: `steps` of (seconds from the start, mode), the first at 0."""
    device: DeviceClass
    steps: tuple[tuple[float, str], ...] = ((0.0, "MAXN"),)

    def __post_init__(self):
        if not self.steps or self.steps[0][0] != 0:
            raise ValueError("a power schedule starts with a mode at time 0")
        times = [t for t, _ in self.steps]
        if times != sorted(times) or len(set(times)) != len(times):
            raise ValueError(f"power schedule times must increase, got {times}")
        for _, mode in self.steps:
            self.device.factor(mode)  # an unknown mode is refused now, not mid-run

    def describe(self) -> str:
        """How a device on this schedule computes, in one phrase for an experiment's output."""
        modes = ", ".join(f"{mode} from {t:g} s" for t, mode in self.steps)
        return (f"{self.device.name}: compute = this machine's CPU x{self.device.slowdown:g} (sleep-padded after each "
                f"forward; see hat.testbed.device_profiles), power modes {modes}")

    def factor_at(self, elapsed_s: float) -> float:
        mode = [m for t, m in self.steps if t <= elapsed_s][-1]
        return self.device.factor(mode)


class ComputeThrottle:
    """Slows a DeviceModel's compute to a schedule's factor (see the module doc). `padded_s`: sleep added so far."""

    _METHODS = {"input_part": ("embed", "forward_layers"), "output_part": ("forward_layers", "logits"),
                "adapter": ("forward",)}

    def __init__(self, model, schedule: PowerSchedule, clock: Callable[[], float] = time.monotonic):
        if schedule.device.slowdown < 1 or min(schedule.device.modes.values()) < 1:
            raise ValueError("an emulated device cannot be faster than this machine (slowdowns must be >= 1)")
        self.schedule, self._clock = schedule, clock
        self.started = clock()
        self.padded_s = 0.0
        self.compute_s = 0.0  # time the real forwards took here
        self._lock = threading.Lock()
        self._depth = threading.local()  # nested calls (a part's forward inside another's) are padded once
        for part_name, methods in self._METHODS.items():
            part = getattr(model, part_name, None)
            for name in methods if part is not None else ():
                setattr(part, name, self._wrap(getattr(part, name)))

    def factor(self) -> float:
        return self.schedule.factor_at(self._clock() - self.started)

    def _wrap(self, method):
        @functools.wraps(method)
        def slowed(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            self._depth.value = depth + 1
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth.value = depth
                if depth == 0:
                    took = time.perf_counter() - began
                    pad = (self.factor() - 1) * took
                    with self._lock:
                        self.compute_s += took
                        self.padded_s += pad
                    if pad > 0:
                        time.sleep(pad)
        return slowed

    def describe(self) -> str:
        """One line for an experiment's output: how this device's compute is emulated."""
        return self.schedule.describe()
