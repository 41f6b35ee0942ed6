"""The cloud's cost as a device sees it (hat.device.cloud_cost): the cloud's published predictor scaled by a moving
ratio of the compute times replies report to it."""
from __future__ import annotations

import pytest

from hat.common.proto import hat_pb2 as pb
from hat.device.cloud_cost import CloudCostTracker


class PublishedPredictor:
    """A link whose cloud publishes a fixed predictor: 2 ms + 50 us a token."""

    def __init__(self):
        self.cloud_latency = pb.LatencyReply(base_us=2000, per_token_us=50)

    def refresh_latency(self):
        return self.cloud_latency


def test_the_first_measurement_replaces_the_neutral_ratio_and_later_ones_move_it():
    """A cloud 4x slower than it publishes: one chunk's compute time sets the ratio to 4 (a loaded cloud is planned
    for from its first reply), and a later 2x chunk moves it part of the way, not all of it."""
    tracker = CloudCostTracker(PublishedPredictor())
    assert tracker.cost()[0].predict(100) == pytest.approx(7e-3)
    tracker.observe(100, 0, 4 * 7e-3, batch_sessions=1)
    assert tracker.ratio == pytest.approx(4.0)
    assert tracker.cost()[0].predict(100) == pytest.approx(28e-3)
    tracker.observe(100, 0, 2 * 7e-3, batch_sessions=1)
    assert 2.0 < tracker.ratio < 4.0


def test_a_reply_that_reports_no_batch_leaves_the_ratio():
    """batch_sessions 0: a cloud that does not say how its compute time was shared; the time is not compared."""
    tracker = CloudCostTracker(PublishedPredictor())
    tracker.observe(100, 0, 1.0, batch_sessions=0)
    assert tracker.ratio == 1.0


def test_on_shared_cores_the_device_plans_with_its_own_fit_once_it_has_three_timings():
    """cost(own=True) (device and cloud on the same cores): the published predictor scaled until three compute
    times came back, then the device's own fit of them (3 ms + 30 us a token here), whatever the cloud publishes."""
    tracker = CloudCostTracker(PublishedPredictor())
    for tokens in (32, 128):
        tracker.observe(tokens, 0, 3e-3 + 30e-6 * tokens, batch_sessions=1)
    assert tracker.cost(own=True)[0] == tracker.cost()[0]
    tracker.observe(512, 0, 3e-3 + 30e-6 * 512, batch_sessions=1)
    assert tracker.cost(own=True)[0].predict(839) == pytest.approx(3e-3 + 30e-6 * 839, rel=1e-6)


def test_a_published_line_that_misses_large_chunks_is_corrected_at_the_sizes_timed():
    """The cloud publishes 2 ms + 50 us a token (fitted on small forwards) but a 512-token chunk takes 3x what that
    says. Chunks of 32 and 512 tokens in turns swing the moving ratio between the two sizes' ratios; the cost the
    planner gets stays within 10% of each size's measured time, where the ratio alone misses one by over 30%."""
    tracker = CloudCostTracker(PublishedPredictor())
    measured = {32: 2e-3 + 50e-6 * 32, 512: 3 * (2e-3 + 50e-6 * 512)}
    for _ in range(10):
        for tokens, seconds in measured.items():
            tracker.observe(tokens, 0, seconds, batch_sessions=1)
    cost = tracker.cost()[0]
    for tokens, seconds in measured.items():
        assert cost.predict(tokens) == pytest.approx(seconds, rel=0.1)
    ratio_only = cost.line
    assert max(abs(ratio_only.predict(tokens) / seconds - 1) for tokens, seconds in measured.items()) > 0.3


def test_one_outlier_chunk_barely_moves_the_planners_cost_and_a_slower_cloud_moves_it_at_once():
    """What the pipeline's re-plan check reads (device/prefill.py): the planner's cost of a chunk, not the raw moving
    ratio. After 20 chunks as published, one chunk twice as slow moves the ratio by 30% (past the default drift of
    25%, a re-plan for nothing) and the planner's cost by under 5%; a cloud that stays twice as slow moves the
    planner's cost by over 50% within three chunks (the fit's change watch)."""
    tracker = CloudCostTracker(PublishedPredictor())
    as_published = 2e-3 + 50e-6 * 256
    for _ in range(20):
        tracker.observe(256, 0, as_published, batch_sessions=1)
    before = tracker.cost()[0].predict(256)
    tracker.observe(256, 0, 2 * as_published, batch_sessions=1)
    assert tracker.ratio == pytest.approx(1.3)
    assert tracker.cost()[0].predict(256) == pytest.approx(before, rel=0.05)
    for _ in range(2):
        tracker.observe(256, 0, 2 * as_published, batch_sessions=1)
    assert tracker.cost()[0].predict(256) > 1.5 * before
