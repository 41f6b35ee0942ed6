"""The fitted line corrected near its timed sizes (hat.common.local_cost): right where a part changes regime, the line
itself far from every timing, never zero or negative, smooth across size classes."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hat.common.cost_fit import CostFit, attended
from hat.common.local_cost import PRIOR_TIMINGS, local_cost


def two_regimes(tokens: int, start: int = 0) -> float:
    """A forward bound by reading its weights when small (40 ms whatever the size) and by arithmetic when large,
    the shape SmolLM2's cloud layers showed on 2 cores (not a line: 1.6 ms a token past the knee)."""
    return max(0.04, 1.6e-3 * tokens) + 2e-8 * attended(tokens, start)


def fit_of(sizes, cost=two_regimes, noise: float = 0.0, seed: int = 0, per_size: int = 4,
           max_start: int = 512) -> CostFit:
    rng, fit = random.Random(seed), CostFit()
    order = [tokens for tokens in sizes for _ in range(per_size)]
    rng.shuffle(order)  # sizes interleaved, as prompts come (in size order the change watch would see a change)
    for tokens in order:
        start = rng.randint(0, max_start)
        fit.add(tokens, attended(tokens, start), cost(tokens, start) * (1 + rng.uniform(-noise, noise)))
    return fit


def test_right_at_the_timed_sizes_where_the_line_is_not():
    """Timings of whole prompts (no cache before them) of 16, 32, 256 and 1024 tokens of a two-regime part, 5% noise:
    the line misses at least one timed size by over 10% (the premise), the local cost is within 5% of the truth at
    every timed size."""
    sizes = (16, 32, 256, 1024)
    fit = fit_of(sizes, noise=0.05, per_size=8, max_start=0)
    line, local = fit.cost, local_cost(fit)
    assert max(abs(line.predict(n) / two_regimes(n) - 1) for n in sizes) > 0.10
    for n in sizes:
        assert local.predict(n) == pytest.approx(two_regimes(n), rel=0.05)


def test_far_from_every_timing_it_is_the_line():
    """Timed only at 512-1024 tokens: at 1 token (nine doublings away) the factor is 1, the line's prediction."""
    fit = fit_of((512, 700, 1024))
    local = local_cost(fit)
    assert local.factor(1) == pytest.approx(1.0, abs=1e-6)
    assert local.predict(1, 0) == pytest.approx(fit.cost.predict(1, 0), rel=1e-6)


def test_a_lone_timing_moves_the_line_part_of_the_way():
    """One class holding one timing at ratio r to the line: at its size the factor is r ** (1 / (1 + prior))."""
    fit = CostFit()
    for tokens in (64, 128, 256):  # on the line 1 ms + 10 us a token
        fit.add(tokens, 0.0, 1e-3 + 1e-5 * tokens)
    fit.add(2048, 0.0, 2 * (1e-3 + 1e-5 * 2048))  # one timing, twice the line
    local = local_cost(fit)
    ratio = 2 * (1e-3 + 1e-5 * 2048) / fit.cost.batch(2048, 0.0)
    assert local.factor(2048) == pytest.approx(ratio ** (1 / (1 + PRIOR_TIMINGS)), rel=1e-3)


def test_smooth_across_size_classes():
    """No jump at a class boundary (255 | 256 tokens): the planner must not prefer a size for its class."""
    local = local_cost(fit_of((32, 128, 512, 2048), per_size=8))
    for edge in (64, 128, 256, 512, 1024):
        assert local.factor(edge - 1) == pytest.approx(local.factor(edge), rel=0.01)


def test_scaled_keeps_the_correction():
    local = local_cost(fit_of((32, 1024)))
    assert local.scaled(3.0).predict(1024, 7) == pytest.approx(3.0 * local.predict(1024, 7), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(knee=st.floats(0.001, 0.2), per_token=st.floats(1e-6, 1e-2), noise=st.floats(0.0, 0.6, allow_subnormal=False),
       sizes=st.lists(st.integers(1, 4096), min_size=1, max_size=12), seed=st.integers(0, 1000))
def test_no_prediction_of_a_stage_that_computes_is_zero_or_negative(knee, per_token, noise, sizes, seed):
    """Noisy timings of any part that computes: every prediction, timed size or not, is positive and finite."""
    def cost(tokens, start):
        return max(knee, per_token * tokens)

    local = local_cost(fit_of(sizes, cost, noise, seed, per_size=2))
    for tokens in (1, 16, 100, 1000, 8192):
        value = local.predict(tokens, 64)
        assert value > 0 and math.isfinite(value)


@pytest.mark.parametrize("seed", range(6))
def test_a_size_the_line_misses_is_no_change_of_the_hardware(seed):
    """A two-regime part timed at interleaved sizes, 5% noise: the line misses some sizes by over 10%, yet the change
    watch rescales nothing (each timing is judged against its own size class's standing to the line)."""
    fit = fit_of((16, 32, 256, 1024), noise=0.05, per_size=8, seed=seed, max_start=0)
    assert fit.changes == 0
    assert local_cost(fit).predict(1024) == pytest.approx(two_regimes(1024), rel=0.05)


def test_the_cost_is_kept_until_the_fit_takes_a_timing_or_the_line_changes():
    """local_cost gives the same object while nothing changed (the planner asks before every prompt), and after a
    timing or with another line the cost a fit with the same timings gives afresh."""
    fit, twin = fit_of([32, 256, 1024]), fit_of([32, 256, 1024])
    first = local_cost(fit)
    assert local_cost(fit) is first
    fit.add(1024, attended(1024, 0), 3 * two_regimes(1024))
    twin.add(1024, attended(1024, 0), 3 * two_regimes(1024))
    after = local_cost(fit)
    assert after is not first and after.predict(1024) > first.predict(1024)
    assert after.predict(1024) == pytest.approx(local_cost(twin).predict(1024), rel=1e-12)
    doubled = local_cost(fit, fit.cost.scaled(2.0))
    assert doubled is not after and doubled.line == fit.cost.scaled(2.0)
    assert local_cost(fit) is not doubled and local_cost(fit).line == fit.cost
