"""Emulated device compute: this machine's forwards, sleep-padded to a device class and power mode."""
from __future__ import annotations

import time

import pytest
import torch

from hat.common.split import split_checkpoint
from hat.device.device_model import DeviceModel
from hat.testbed.device_profiles import (JETSON_AGX_ORIN, JETSON_AGX_XAVIER, ComputeThrottle, DeviceClass,
                                         PowerSchedule)


@pytest.fixture(scope="module")
def device_dir(tiny_checkpoint, tmp_path_factory):
    device_dir, _ = split_checkpoint(tiny_checkpoint("llama3"), 2, 1, tmp_path_factory.mktemp("profiles") / "b")
    return device_dir


def workload(model: DeviceModel) -> tuple[float, torch.Tensor]:
    """A prefill of 48 tokens through the input part, then the output part and head: (seconds, logits)."""
    torch.manual_seed(0)
    began = time.perf_counter()
    hidden, _ = model.run_input(list(range(3, 51)), 0, model.input_part.new_cache())
    out = model.output_part.forward_layers(hidden, [_span(model.output_part.new_cache(), 48)])
    logits = model.output_part.logits(out)
    return time.perf_counter() - began, logits


def _span(cache, count):
    from hat.common.layers import SequenceSpan
    return SequenceSpan(cache, 0, count)


@torch.inference_mode()
def test_a_device_three_times_slower_takes_three_times_as_long_with_the_same_outputs(device_dir):
    """Orin class in its 15 W mode (x3.10): each forward is followed by a sleep of 2.10x the time it took, so the
    throttled work's wall time is 3.10x its own compute (checked within one run against the throttle's own
    measurements: load that slows the forwards slows their padding alike), the logits are bit for bit the
    unthrottled ones, and it is clearly slower than the unthrottled model taking turns with it."""
    plain = DeviceModel.load(device_dir)
    slowed = DeviceModel.load(device_dir)
    throttle = ComputeThrottle(slowed, PowerSchedule(JETSON_AGX_ORIN, ((0.0, "15W"),)))
    for _ in range(3):  # warm-up
        workload(plain), workload(slowed)
    compute_before, padded_before = throttle.compute_s, throttle.padded_s
    walls = [workload(slowed)[0] for _ in range(5)]
    compute, padded = throttle.compute_s - compute_before, throttle.padded_s - padded_before
    assert padded == pytest.approx(2.10 * compute, rel=1e-6)
    # the sleeps happened: wall = compute + padding (+ the Python around them and sleeps' overshoot)
    assert compute + padded <= sum(walls) <= 1.15 * (compute + padded) + 0.005 * len(walls)
    ratio = sorted(workload(slowed)[0] / workload(plain)[0] for _ in range(7))[3]  # paired, median of 7
    assert ratio > 1.5, ratio  # 3.10 on a quiet machine; a loaded one inflates the unpadded forwards more
    assert torch.equal(workload(plain)[1], workload(slowed)[1])
    assert "jetson-agx-orin" in throttle.describe() and "sleep-padded" in throttle.describe()


def test_power_modes_change_the_factor_on_schedule(device_dir):
    now = [100.0]
    schedule = PowerSchedule(JETSON_AGX_XAVIER, ((0.0, "MAXN"), (10.0, "15W"), (20.0, "10W")))
    throttle = ComputeThrottle(DeviceModel.load(device_dir), schedule, clock=lambda: now[0])
    assert throttle.factor() == 1.5
    now[0] = 109.9
    assert throttle.factor() == 1.5
    now[0] = 110.0
    assert throttle.factor() == pytest.approx(1.5 * 2.06)
    now[0] = 500.0
    assert throttle.factor() == pytest.approx(1.5 * 2.65)


def test_bad_profiles_are_refused(device_dir):
    with pytest.raises(ValueError, match="faster than this machine"):
        ComputeThrottle(DeviceModel.load(device_dir), PowerSchedule(DeviceClass("fast", 0.5, {"MAXN": 1.0})))
    with pytest.raises(ValueError, match="power modes"):
        PowerSchedule(JETSON_AGX_ORIN, ((0.0, "TURBO"),))
    with pytest.raises(ValueError, match="time 0"):
        PowerSchedule(JETSON_AGX_ORIN, ((1.0, "MAXN"),))
    with pytest.raises(ValueError, match="increase"):
        PowerSchedule(JETSON_AGX_ORIN, ((0.0, "MAXN"), (5.0, "15W"), (5.0, "30W")))
