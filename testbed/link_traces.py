"""Bandwidth traces: link rates that change over time, for the link shim (hat.testbed.link_shim).

A `BandwidthTrace` is a list of piecewise-constant steps (start_s, uplink_bytes_per_s, downlink_bytes_per_s):
each step's rates hold from its start until the next step starts. The first step starts at 0; the last
one holds forever, or, with `period_s`, until period_s, after which the trace starts again from its first step.

Rates are in bytes per second in code, as in LinkProfile; in CSV files they are in MB/s (1 MB = 10^6 bytes,
as the testbed scenarios' up_MBps / down_MBps), with the header `time_s,up_MBps,down_MBps`:

    time_s,up_MBps,down_MBps
    0,10,15
    2.5,5,10        # from 2.5 s on: 5 MB/s up, 10 MB/s down

`wifi_like_trace` draws a seeded random walk within given ranges (HAT's Wi-Fi: 5-10 MB/s up, 10-15 MB/s down),
one step every `step_s` seconds.
"""
from __future__ import annotations

import bisect
import csv
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

MB = 1e6  # bytes in the CSV files' MB
CSV_COLUMNS = ("time_s", "up_MBps", "down_MBps")
HAT_UPLINK_BYTES_PER_S = (5e6, 10e6)  # HAT's Wi-Fi uplink range
HAT_DOWNLINK_BYTES_PER_S = (10e6, 15e6)  # and downlink range


@dataclass(frozen=True, slots=True)
class BandwidthTrace:
    steps: tuple[tuple[float, float, float], ...]  # (start_s, uplink bytes/s, downlink bytes/s); starts 0, increasing
    period_s: float | None = None  # loop with this period (> the last start); None: the last step holds forever
    _starts: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps = tuple(tuple(float(value) for value in _triple(step, index)) for index, step in enumerate(self.steps))
        if not steps:
            raise ValueError("a bandwidth trace needs at least one step")
        if steps[0][0] != 0.0:
            raise ValueError(f"a bandwidth trace's first step must start at 0 s, not {steps[0][0]!r}")
        for index, (start, up, down) in enumerate(steps):
            if not math.isfinite(start):
                raise ValueError(f"bandwidth trace step {index} starts at {start!r}: times must be finite")
            if index and not start > steps[index - 1][0]:
                raise ValueError(f"bandwidth trace step {index} starts at {start!r} s, not after the previous "
                                 f"step's {steps[index - 1][0]!r} s: step times must increase strictly")
            for name, rate in (("uplink", up), ("downlink", down)):
                if not (math.isfinite(rate) and rate > 0):
                    raise ValueError(f"bandwidth trace step {index} has {name} rate {rate!r}: rates must be finite "
                                     "and positive (bytes/s)")
        if self.period_s is not None and not (math.isfinite(self.period_s) and self.period_s > steps[-1][0]):
            raise ValueError(f"a bandwidth trace's period_s ({self.period_s!r}) must be finite and after its last "
                             f"step's start ({steps[-1][0]!r} s)")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "_starts", tuple(step[0] for step in steps))

    def rates_at(self, t: float) -> tuple[float, float]:
        """(uplink, downlink) bytes/s at `t` seconds from the trace's origin."""
        _, index = self._locate(t)
        return self.steps[index][1], self.steps[index][2]

    def transmit_end(self, start_s: float, size: float, uplink: bool) -> float:
        """When `size` bytes put on the link at `start_s` (seconds from the origin) have left it: the bytes go at
        each step's rate while it lasts, the rest at the next step's."""
        if size <= 0:
            return start_s
        column = 1 if uplink else 2
        base, index = self._locate(start_s)
        local, remaining = start_s - base, float(size)
        while True:
            rate = self.steps[index][column]
            end = self._step_end(index)
            capacity = (end - local) * rate
            if remaining <= capacity:
                return base + local + remaining / rate
            remaining -= capacity
            index += 1
            if index < len(self.steps):
                local = end
                continue
            # past the end of a looping trace: skip whole periods, keeping some bytes for the last one
            per_period = self.bytes_per_period(uplink)
            whole = max(0, math.ceil(remaining / per_period) - 1)
            base, local, index, remaining = base + (whole + 1) * self.period_s, 0.0, 0, remaining - whole * per_period

    def bytes_per_period(self, uplink: bool) -> float:
        """Bytes one direction carries over one period of a looping trace."""
        if self.period_s is None:
            raise ValueError("only a looping trace (period_s set) has a period")
        column = 1 if uplink else 2
        return sum((self._step_end(index) - step[0]) * step[column] for index, step in enumerate(self.steps))

    def to_csv(self, path: str | Path) -> None:
        """Write the steps as `time_s,up_MBps,down_MBps` (the period is not written: pass it to from_csv)."""
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(CSV_COLUMNS)
            for start, up, down in self.steps:
                writer.writerow((repr(start), repr(up / MB), repr(down / MB)))

    @classmethod
    def from_csv(cls, path: str | Path, period_s: float | None = None) -> "BandwidthTrace":
        """Read `time_s,up_MBps,down_MBps` rows (a header first; blank lines and text after '#' are ignored)."""
        rows = []
        with open(path, newline="") as file:
            for number, line in enumerate(file, start=1):
                text = line.split("#", 1)[0].strip()
                if text:
                    rows.append((number, [cell.strip() for cell in next(csv.reader([text]))]))
        if not rows:
            raise ValueError(f"{path}: empty bandwidth trace (expected a header {','.join(CSV_COLUMNS)} and rows)")
        (_, header), *body = rows
        if tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{path}: the header must be {','.join(CSV_COLUMNS)} (rates in MB/s, 1 MB = 10^6 "
                             f"bytes), not {','.join(header)}")
        steps = []
        for number, cells in body:
            if len(cells) != 3:
                raise ValueError(f"{path}:{number}: expected 3 values ({','.join(CSV_COLUMNS)}), got {len(cells)}")
            try:
                start, up, down = (float(cell) for cell in cells)
            except ValueError:
                raise ValueError(f"{path}:{number}: not numbers: {','.join(cells)}") from None
            steps.append((start, up * MB, down * MB))
        if not steps:
            raise ValueError(f"{path}: empty bandwidth trace (a header and no rows)")
        try:
            return cls(tuple(steps), period_s)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def _step_end(self, index: int) -> float:
        if index + 1 < len(self.steps):
            return self.steps[index + 1][0]
        return math.inf if self.period_s is None else self.period_s

    def _locate(self, t: float) -> tuple[float, int]:
        """(start of the period holding t, index of the step holding t)."""
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"trace time must be finite and non-negative, not {t!r}")
        base = 0.0
        if self.period_s is not None:
            base = math.floor(t / self.period_s) * self.period_s
            if t - base >= self.period_s:  # rounding
                base += self.period_s
        return base, bisect.bisect_right(self._starts, t - base) - 1


def wifi_like_trace(duration_s: float, step_s: float = 1.0,
                    uplink_range: tuple[float, float] = HAT_UPLINK_BYTES_PER_S,
                    downlink_range: tuple[float, float] = HAT_DOWNLINK_BYTES_PER_S,
                    max_change: float = 0.25, seed: int = 0, loop: bool = False) -> BandwidthTrace:
    """A seeded random walk: a step every `step_s` over `duration_s`, each direction starting at a uniform draw in its
    range and moving by up to `max_change` of its range's width per step, reflected back into the range.
    With `loop`, the trace repeats every `duration_s`; else its last step holds."""
    if not (math.isfinite(duration_s) and math.isfinite(step_s) and 0 < step_s <= duration_s):
        raise ValueError(f"need 0 < step_s <= duration_s (finite), got step_s={step_s!r}, duration_s={duration_s!r}")
    if not 0 <= max_change <= 1:
        raise ValueError(f"max_change is a fraction of the range, in [0, 1], not {max_change!r}")
    for name, (low, high) in (("uplink_range", uplink_range), ("downlink_range", downlink_range)):
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"{name} must be (low, high) bytes/s with 0 < low <= high, not {(low, high)!r}")
    rng = random.Random(seed)
    count = max(1, math.ceil(duration_s / step_s - 1e-9))
    walks = []
    for low, high in (uplink_range, downlink_range):
        value, walk = rng.uniform(low, high), []
        for _ in range(count):
            walk.append(value)
            value = _reflect(value + rng.uniform(-max_change, max_change) * (high - low), low, high)
        walks.append(walk)
    steps = tuple((index * step_s, up, down) for index, (up, down) in enumerate(zip(*walks)))
    return BandwidthTrace(steps, duration_s if loop else None)


def _reflect(value: float, low: float, high: float) -> float:
    if high == low:
        return low
    width = high - low
    folded = (value - low) % (2 * width)
    return low + (folded if folded <= width else 2 * width - folded)


def _triple(step, index: int) -> tuple:
    try:
        values = tuple(step)
    except TypeError:
        raise ValueError(f"bandwidth trace step {index} must be (start_s, uplink, downlink), not {step!r}") from None
    if len(values) != 3:
        raise ValueError(f"bandwidth trace step {index} must be (start_s, uplink, downlink), not {step!r}")
    try:
        return tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise ValueError(f"bandwidth trace step {index} has a value that is not a number: {step!r}") from None
