"""The draft length chooser on synthetic costs: expected tokens per second against exact arithmetic, and the
choices that follow (bad acceptance -> plain decoding, cheap drafts and good acceptance -> long drafts)."""
from __future__ import annotations

import pytest

from hat.device.draft_length import (GIVE_UP_ROUNDS, PREDRAFT_MIN_CHANCE, EXPLORE_EVERY, AcceptanceTracker, DraftLengthChooser, ParallelGuard,
                                     best_length)


def constant(rate: float):
    """Expected tokens of a draft of n when every position is accepted with `rate` (given the ones before)."""
    return lambda n: sum(rate ** i for i in range(n + 1))


def linear_round(base_s: float, per_token_s: float):
    return lambda tokens: base_s + per_token_s * tokens


def brute_force(expected, step_s, round_s, limit, free=0):
    rates = [expected(n) / (max(0, n - free) * step_s + round_s(n + 1)) for n in range(limit + 1)]
    return rates.index(max(rates))


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.2])
def test_bad_acceptance_drafts_nothing(rate):
    # SmolLM2-like costs: 7.6 ms per draft step, a round of 40 ms + 4 ms per token
    assert best_length(constant(rate), 0.0076, linear_round(0.040, 0.004), 8) == 0


def test_cheap_drafts_and_good_acceptance_draft_long():
    assert best_length(constant(0.9), 0.001, linear_round(0.060, 0.0005), 8) == 8
    assert best_length(constant(0.9), 0.001, linear_round(0.060, 0.0005), 3) == 3  # capped by the limit


def test_expensive_drafts_draft_short():
    # a draft step as dear as a round: only near-certain acceptance pays, and not for long
    assert best_length(constant(0.6), 0.05, linear_round(0.05, 0.0), 8) == 0
    n = best_length(constant(0.8), 0.004, linear_round(0.03, 0.0), 8)
    assert 1 <= n < 8


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7, 0.85, 0.95])
@pytest.mark.parametrize("step_ms", [0.5, 2, 7.6, 20])
@pytest.mark.parametrize("free", [0, 2])
def test_the_choice_is_the_best_tokens_per_second(rate, step_ms, free):
    expected, round_s = constant(rate), linear_round(0.023, 0.004)
    assert best_length(expected, step_ms / 1000, round_s, 8, free) == brute_force(expected, step_ms / 1000, round_s, 8, free)


def test_drafts_made_ahead_cost_nothing():
    # with 3 tokens already drafted for free, drafting them beats plain decoding even at dear draft steps
    assert best_length(constant(0.5), 0.1, linear_round(0.02, 0.001), 8, free=0) == 0
    assert best_length(constant(0.5), 0.1, linear_round(0.02, 0.001), 8, free=3) == 3


def test_acceptance_is_measured_per_position():
    tracker = AcceptanceTracker(4)
    assert tracker.rate(1) == pytest.approx(0.5)  # the prior
    for _ in range(200):
        tracker.observe(drafted=4, accepted=1)  # position 1 always accepted, position 2 always rejected
    assert tracker.rate(1) > 0.95 and tracker.rate(2) < 0.06  # the prior weighs 2 of ~35 decayed rounds
    assert tracker.rate(3) == pytest.approx(tracker.rate(2))  # never reached: leans on the position before
    assert tracker.expected_tokens(1) == pytest.approx(1 + tracker.rate(1))
    assert tracker.expected_tokens(4) < 2.05


def test_acceptance_follows_a_change():
    tracker = AcceptanceTracker(2)
    for _ in range(100):
        tracker.observe(2, 2)
    for _ in range(100):
        tracker.observe(2, 0)
    assert tracker.rate(1) < 0.1  # older rounds decay away


def test_chooser_learns_that_a_bad_adapter_does_not_pay_and_still_probes():
    chooser = DraftLengthChooser(8)
    costs = dict(draft_step_s=0.0076, round_s=linear_round(0.040, 0.004))
    assert chooser.choose(None, costs["round_s"], 8) == 2  # the draft step is not timed yet: a short draft
    lengths = []
    for _ in range(60):
        n = chooser.choose(costs["draft_step_s"], costs["round_s"], 8)
        chooser.observe(n, 0)  # every draft rejected
        lengths.append(n)
    assert lengths[-EXPLORE_EVERY:].count(0) >= EXPLORE_EVERY - 1  # plain decoding from then on...
    assert 0 < sum(lengths[20:]) <= 3  # ...with an occasional one-token probe
    assert chooser.choose(0.001, costs["round_s"], 0) == 0  # no room: nothing


def test_chooser_drafts_long_for_a_good_adapter():
    chooser = DraftLengthChooser(8)
    for _ in range(30):
        n = chooser.choose(0.002, linear_round(0.040, 0.002), 8)
        chooser.observe(n, n)  # everything accepted
    assert chooser.choose(0.002, linear_round(0.040, 0.002), 8) == 8


def test_parallel_guard_stops_drafting_ahead_when_it_slows_the_cloud():
    slowed, idle = ParallelGuard(), ParallelGuard()
    for guard, slowdown in ((slowed, 1.5), (idle, 1.02)):
        for _ in range(40):
            ahead = guard.allow()
            guard.observe(ahead, 0.03 * (slowdown if ahead else 1.0), 0.03)
    assert not slowed.enabled and not slowed.allow()
    assert idle.enabled


def test_drafting_ahead_only_where_it_is_likely_to_be_kept():
    chooser = DraftLengthChooser(4)
    assert chooser.predraft_pays(0)  # the prior: position 1 accepted half the time
    for _ in range(20):
        chooser.observe(1, 0)  # the draft's first token always rejected
    assert not chooser.predraft_pays(0) and not chooser.predraft_pays(2)
    for _ in range(60):
        chooser.observe(3, 3)  # whole drafts of 3 accepted
    assert chooser.predraft_pays(0) and chooser.predraft_pays(2)
    reach = chooser.acceptance.reach(3)
    assert reach == pytest.approx(chooser.acceptance.rate(1) * chooser.acceptance.rate(2) * chooser.acceptance.rate(3))
    assert chooser.predraft_pays(2) == (reach >= PREDRAFT_MIN_CHANCE)


def test_guesses_made_while_drafting_ahead_are_measured_like_drafts():
    """Rounds that draft nothing but guess the bonus token ahead: wrong guesses lower position 1's acceptance
    (an optimistic start included) until guessing ahead stops; right ones count as accepted drafts."""
    chooser = DraftLengthChooser(4)
    chooser.acceptance.prior = 0.9
    rounds = 0
    while chooser.predraft_pays(0):
        chooser.observe(0, 0, guessed=False)
        rounds += 1
        assert rounds < 10
    assert rounds >= 1 and chooser.acceptance.rate(1) < PREDRAFT_MIN_CHANCE
    tried = chooser.acceptance.tried[1]
    chooser.observe(1, 1, guessed=True)  # a draft of 1 accepted, then the guess for position 2 right
    assert chooser.acceptance.tried[1] > tried and chooser.acceptance.accepted[1] > 0
    before = list(chooser.acceptance.tried)
    chooser.observe(2, 0, guessed=None)  # position 1 rejected, no guess: position 2 was never tried
    assert chooser.acceptance.tried[0] > before[0] and chooser.acceptance.tried[1] == before[1]


def test_a_generation_gives_up_speculating_only_after_rounds_in_a_row_accept_nothing():
    chooser = DraftLengthChooser(4)
    for _ in range(GIVE_UP_ROUNDS - 1):
        chooser.observe(0, 0, guessed=False)  # nothing drafted, the bonus token guessed ahead wrongly
    assert not chooser.gave_up()
    chooser.observe(1, 1)  # one accepted draft token starts the count again
    for _ in range(GIVE_UP_ROUNDS - 1):
        chooser.observe(0, 0, guessed=False)
    assert not chooser.gave_up()
    chooser.observe(1, 0)  # an explore round rejected: the count goes on
    assert chooser.acceptance.rate(1) < PREDRAFT_MIN_CHANCE and chooser.gave_up()
    optimistic = DraftLengthChooser(4)
    optimistic.acceptance.prior = 0.9
    for _ in range(GIVE_UP_ROUNDS):
        optimistic.observe(0, 0)
    assert not optimistic.gave_up()  # guessing ahead still looks worth it: keep speculating
