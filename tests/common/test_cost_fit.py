"""The fitted forward-latency model (hat.common.cost_fit): the attention feature, LinearCost, and CostFit's
non-negative least squares over a sliding window of timings."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hat.common.cost_fit import CHANGE_RUN, ZERO_COST, CostFit, LinearCost, attended

TRUE = LinearCost(base_s=2e-3, per_token_s=50e-6, per_attended_s=5e-9)


def timings(cost: LinearCost, count: int, seed: int, noise: float = 0.0, max_tokens: int = 512,
            max_start: int = 4096) -> list[tuple[int, float, float]]:
    """`count` (tokens, attended pairs, seconds) of forwards at random lengths and cache positions, the seconds
    from `cost` times a uniform relative noise of +-`noise`."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        tokens, start = rng.randint(1, max_tokens), rng.randint(0, max_start)
        seconds = cost.predict(tokens, start) * (1 + rng.uniform(-noise, noise))
        out.append((tokens, attended(tokens, start), seconds))
    return out


def fitted(samples, window: int = 256, fallback: LinearCost = ZERO_COST) -> CostFit:
    fit = CostFit(window=window, fallback=fallback)
    for tokens, pairs, seconds in samples:
        fit.add(tokens, pairs, seconds)
    return fit


def assert_close(cost: LinearCost, expected: LinearCost, rel: float) -> None:
    assert cost.base_s == pytest.approx(expected.base_s, rel=rel)
    assert cost.per_token_s == pytest.approx(expected.per_token_s, rel=rel)
    assert cost.per_attended_s == pytest.approx(expected.per_attended_s, rel=rel)


def assert_non_negative(cost: LinearCost) -> None:
    assert cost.base_s >= 0 and cost.per_token_s >= 0 and cost.per_attended_s >= 0, cost


# --------------------------------------------------------------------------------------- attended, LinearCost


def test_attended_counts_causal_query_key_pairs():
    """attended() equals a direct count of the keys each new query position sees (its own and all before)."""
    for tokens in (1, 2, 7, 64):
        for start in (0, 1, 100):
            direct = sum(start + q + 1 for q in range(tokens))
            assert attended(tokens, start) == direct


def test_attended_is_additive_over_chunks():
    """Cutting a forward into consecutive chunks keeps the total of query-key pairs (the feature adds up)."""
    assert attended(30, 5) + attended(70, 35) == attended(100, 5)


def test_linear_cost_predict_and_scaled():
    """predict() is base + per token + per pair, and scaled() multiplies every coefficient."""
    cost = LinearCost(1.0, 0.5, 0.25)
    assert cost.predict(4, 2) == 1.0 + 0.5 * 4 + 0.25 * attended(4, 2)
    assert cost.predict(3) == 1.0 + 1.5 + 0.25 * 6
    assert cost.scaled(2.0) == LinearCost(2.0, 1.0, 0.5)
    assert ZERO_COST.predict(1000, 1000) == 0.0


# --------------------------------------------------------------------------------------- CostFit


def test_recovers_coefficients_from_noiseless_samples():
    """Exact timings of a known LinearCost give back its coefficients (to rounding)."""
    cost = fitted(timings(TRUE, 50, seed=1)).cost
    assert_close(cost, TRUE, rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_recovers_coefficients_from_mildly_noisy_samples(seed):
    """Timings with +-1% noise give every coefficient within a few percent and predictions within 1%."""
    cost = fitted(timings(TRUE, 256, seed=seed, noise=0.01)).cost
    assert_close(cost, TRUE, rel=0.05)
    for tokens, start in ((1, 0), (128, 0), (512, 4096), (64, 2000)):
        assert cost.predict(tokens, start) == pytest.approx(TRUE.predict(tokens, start), rel=0.01)


@pytest.mark.parametrize("seed", range(20))
def test_never_returns_a_negative_coefficient(seed):
    """With no attention cost (and no base) in the truth, noise would push plain least squares below zero:
    the fit clamps instead, and still predicts well."""
    truth = LinearCost(0.0, 40e-6, 0.0) if seed % 2 else LinearCost(1e-3, 40e-6, 0.0)
    cost = fitted(timings(truth, 64, seed=seed, noise=0.05)).cost
    assert_non_negative(cost)
    assert cost.predict(256, 1000) == pytest.approx(truth.predict(256, 1000), rel=0.05)


def test_clamps_when_timings_fall_with_size():
    """Timings that shrink as forwards grow (a negative slope) still give no negative coefficient."""
    fit = CostFit()
    for tokens in range(1, 40):
        fit.add(tokens, attended(tokens, 0), 1.0 - tokens * 0.01)
    assert_non_negative(fit.cost)


def test_window_keeps_each_size_class_apart():
    """Thousands of one-token decode rounds do not push out the few prompt chunks: the window keeps the newest
    timings of each size class, so a fit over both still predicts a 900-token chunk (where a decode-only fit of
    base and per-pair cost cannot know the per-token cost)."""
    fit = CostFit(window=32)
    for tokens, pairs, seconds in timings(TRUE, 12, seed=6, max_tokens=1024):
        fit.add(tokens, pairs, seconds)
    for tokens, pairs, seconds in timings(TRUE, 3000, seed=7, max_tokens=1):
        fit.add(tokens, pairs, seconds)
    assert len(fit) == 12 + 32
    assert fit.cost.predict(900, 100) == pytest.approx(TRUE.predict(900, 100), rel=1e-6)


@pytest.mark.parametrize("factor", [3.0, 0.4])
def test_follows_a_change_of_the_hardware_within_a_few_timings(factor):
    """The hardware slows down (or speeds up) by `factor` after a full window of timings: CHANGE_RUN timings later
    the fit predicts the new speed, where a plain sliding window would still average old and new."""
    fit = fitted(timings(TRUE, 64, seed=8, noise=0.02), window=64)
    changed = timings(TRUE.scaled(factor), CHANGE_RUN, seed=9, noise=0.02)
    for sample in changed:
        fit.add(*sample)
    assert fit.changes == 1
    for tokens, start in ((16, 0), (256, 0), (512, 1024)):
        assert fit.cost.predict(tokens, start) == pytest.approx(TRUE.scaled(factor).predict(tokens, start), rel=0.08)


def test_noise_and_a_lone_outlier_are_no_change():
    """Timings within the noise, and one outlier among them, leave the fit where it was (no rescaling)."""
    fit = fitted(timings(TRUE, 64, seed=10, noise=0.1), window=64)
    before = fit.cost
    samples = timings(TRUE, 20, seed=11, noise=0.1)
    samples[5] = (samples[5][0], samples[5][1], samples[5][2] * 3)  # one slow forward (a hiccup)
    for sample in samples:
        fit.add(*sample)
    assert fit.changes == 0
    assert fit.cost.predict(256, 512) == pytest.approx(before.predict(256, 512), rel=0.05)


def test_without_the_change_watch_old_timings_keep_their_weight():
    """follow_changes=False (a calibration over a whole run): a change moves the fit only as far as its share."""
    fit = CostFit(window=64, follow_changes=False)
    for sample in timings(TRUE, 64, seed=8) + timings(TRUE.scaled(3.0), CHANGE_RUN, seed=9):
        fit.add(*sample)
    assert fit.changes == 0
    assert fit.cost.predict(256) < TRUE.scaled(2.0).predict(256)


@settings(max_examples=300, deadline=None)
@given(base=st.floats(0, 0.05), per_token=st.floats(1e-7, 1e-3), per_attended=st.floats(0, 1e-8),
       shapes=st.lists(st.tuples(st.integers(1, 2048), st.integers(0, 4096), st.floats(0.5, 2.0)), min_size=1,
                       max_size=40))
def test_no_fit_of_a_stage_that_computes_has_a_zero_or_negative_cost(base, per_token, per_attended, shapes):
    """Property: whatever the true costs of a part that computes (a per-token cost above zero) and whatever the
    noise (each timing off by up to 2x either way), the fit's per-token cost is above zero and no coefficient
    is negative, with the change watch on and off."""
    truth = LinearCost(base, per_token, per_attended)
    for follow in (True, False):
        fit = CostFit(window=8, follow_changes=follow)
        for tokens, start, noise in shapes:
            fit.add(tokens, attended(tokens, start), truth.predict(tokens, start) * noise)
            assert fit.cost.per_token_s > 0
            assert_non_negative(fit.cost)


def test_empty_fit_returns_the_fallback():
    """With no timings the cost is the fallback (ZERO_COST by default)."""
    assert CostFit().cost == ZERO_COST
    prior = LinearCost(1e-3, 2e-5, 3e-9)
    fit = CostFit(fallback=prior)
    assert fit.cost == prior and len(fit) == 0


def test_single_sample_is_a_per_token_cost():
    """One timing gives a pure per-token cost that reproduces it: seconds / tokens, no base or attention term."""
    fit = CostFit(fallback=LinearCost(9.0, 9.0, 9.0))
    fit.add(100, attended(100, 0), 0.5)
    assert len(fit) == 1
    assert fit.cost == LinearCost(0.0, 0.005, 0.0)
    assert fit.cost.predict(100) == pytest.approx(0.5)


def test_ignores_empty_forwards_and_negative_times():
    """A timing with no new positions or no positive duration is dropped."""
    fit = CostFit(fallback=TRUE)
    fit.add(0, 0, 1.0)
    fit.add(10, attended(10, 0), -0.1)
    fit.add(10, attended(10, 0), 0.0)
    assert len(fit) == 0 and fit.cost == TRUE


def test_cost_is_refitted_after_each_add():
    """The cached fit is invalidated by a new timing."""
    fit = fitted(timings(LinearCost(0.0, 1e-5, 0.0), 10, seed=4))
    before = fit.cost
    assert before.per_token_s == pytest.approx(1e-5, rel=1e-6)
    for sample in timings(LinearCost(0.0, 1e-3, 0.0), 10, seed=5):
        fit.add(*sample)
    assert fit.cost.predict(100) > before.predict(100) * 10


def test_window_must_hold_three_timings():
    """A window shorter than the number of coefficients is refused."""
    with pytest.raises(ValueError):
        CostFit(window=2)
    CostFit(window=3)
