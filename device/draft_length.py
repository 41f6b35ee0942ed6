"""How many tokens to draft in a round, from measured costs (no torch: pure arithmetic, unit-tested on its own).

A round that drafts n tokens costs n draft steps plus one verification round over n + 1 positions, and yields
E(n) = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_n tokens in expectation, a_i being the chance that draft position i
is accepted given that every position before it was (measured per position, online). The chooser takes the
n in [0, limit] (0 = plain decoding) that maximizes E(n) / (n * draft_step_s + round_s(n + 1)); tokens drafted
ahead while the previous round was in flight cost nothing more.

An adapter that never agrees with the target soon drafts nothing; so that a better phase of the text gets
noticed, a round drafts one token after every EXPLORE_EVERY rounds that drafted none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

EXPLORE_EVERY = 16  # rounds without a draft before one round drafts a token to measure acceptance again
# drafting ahead while a round is verified is kept only if the round's whole draft is accepted and the bonus token
# is the one guessed; a kept one saves at least a draft step of the next round, a wasted one delays handling the
# reply by half a step on average (the step under way when it arrives): below this chance it does not pay
PREDRAFT_MIN_CHANCE = 0.35
# rounds in a row that drafted nothing accepted (explore rounds included) after which a generation decodes plainly:
# a speculative round that drafts nothing still runs the adapter over its token and the length choice, a few
# percent of a round for nothing; the next generation measures afresh
GIVE_UP_ROUNDS = 24


@dataclass
class AcceptanceTracker:
    """Per-position conditional acceptance, as decayed counts with a prior."""
    positions: int  # draft positions tracked (the longest draft)
    prior: float = 0.5  # acceptance of position 1 assumed before any measurement
    prior_weight: float = 2.0  # how many observations the prior counts as
    decay: float = 0.97  # weight kept by older observations at each new one at the same position

    def __post_init__(self):
        self.accepted = [0.0] * self.positions
        self.tried = [0.0] * self.positions

    def observe(self, drafted: int, accepted: int) -> None:
        """One verified round: positions 1..accepted were accepted, position accepted+1 rejected (if drafted)."""
        for i in range(min(drafted, accepted + 1, self.positions)):
            self.tried[i] = self.decay * self.tried[i] + 1
            self.accepted[i] = self.decay * self.accepted[i] + (1 if i < accepted else 0)

    def rate(self, position: int) -> float:
        """Chance that draft position `position` (1-based) is accepted, given the ones before it were. A position
        seldom reached leans on the one before it (the prior of position 1 is `prior`), so drafts can grow."""
        rate = self.prior
        for i in range(min(position, self.positions)):
            rate = (self.accepted[i] + rate * self.prior_weight) / (self.tried[i] + self.prior_weight)
        return rate

    def reach(self, positions: int) -> float:
        """Chance that draft positions 1..`positions` are all accepted."""
        chance = 1.0
        for position in range(1, positions + 1):
            chance *= self.rate(position)
        return chance

    def expected_tokens(self, drafted: int) -> float:
        """Tokens a round that drafts `drafted` yields in expectation (the target's own token included)."""
        total, reach = 1.0, 1.0
        for position in range(1, drafted + 1):
            reach *= self.rate(position)
            total += reach
        return total


def best_length(expected: Callable[[int], float], draft_step_s: float, round_s: Callable[[int], float],
                limit: int, free: int = 0) -> int:
    """The draft length n in [0, limit] maximizing expected(n) / (max(0, n - free) * draft_step_s + round_s(n + 1))
    (`free`: tokens already drafted, at no further cost); ties go to the shorter draft."""
    best, best_rate = 0, -1.0
    for n in range(limit + 1):
        seconds = max(0, n - free) * draft_step_s + round_s(n + 1)
        rate = expected(n) / seconds if seconds > 0 else float("inf")
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = n, rate
    return best


class DraftLengthChooser:
    """Per generation: the acceptance measured so far and the round-by-round choice."""

    def __init__(self, max_draft: int):
        self.acceptance = AcceptanceTracker(max(1, max_draft))
        self._idle_rounds = 0  # rounds in a row that drafted nothing
        self._fruitless_rounds = 0  # rounds in a row with no draft token accepted

    def choose(self, draft_step_s: float | None, round_s: Callable[[int], float], limit: int, free: int = 0) -> int:
        """`draft_step_s`: None before any draft step was timed (then a short draft measures it)."""
        if limit <= 0:
            return 0
        if draft_step_s is None:
            return min(2, limit)
        n = best_length(self.acceptance.expected_tokens, draft_step_s, round_s, limit, free)
        if n == 0:
            self._idle_rounds += 1
            if self._idle_rounds > EXPLORE_EVERY:
                n = 1
        if n:
            self._idle_rounds = 0
        return n

    def observe(self, drafted: int, accepted: int, guessed: bool | None = None) -> None:
        """One verified round. `guessed`: whether the bonus token guessed while drafting ahead was right (None: no
        guess, or a draft token was rejected first). The guess is the draft of position drafted + 1, so it is
        measured like one: otherwise rounds that draft nothing but guess ahead would never correct the estimate
        that makes guessing ahead look worth it."""
        if guessed is None:
            self.acceptance.observe(drafted, accepted)
        else:
            self.acceptance.observe(drafted + 1, accepted + int(guessed))
        self._fruitless_rounds = 0 if accepted or guessed else self._fruitless_rounds + 1

    def gave_up(self) -> bool:
        """Whether speculation has stopped paying for this generation: GIVE_UP_ROUNDS rounds in a row accepted no
        draft token, and guessing ahead does not pay either."""
        return self._fruitless_rounds >= GIVE_UP_ROUNDS and not self.predraft_pays(0)

    def predraft_pays(self, drafted: int) -> bool:
        """Whether drafting ahead during a round that verifies `drafted` tokens is likely enough to be kept (all of
        them accepted and the bonus token guessed, the guess standing for position drafted + 1)."""
        return self.acceptance.reach(drafted + 1) >= PREDRAFT_MIN_CHANCE


@dataclass
class ParallelGuard:
    """Drafting ahead while the cloud verifies pays only with idle device compute: on a device that shares cores
    with its cloud it slows the cloud. Compares the cloud's reported compute time (over what its cost model
    predicts) in rounds with and without drafting ahead, probing without every `probe_every` rounds, and stops
    drafting ahead once rounds with it are measurably slower."""
    probe_every: int = 6  # every this many rounds, one round does not draft ahead (the comparison's baseline)
    tolerance: float = 0.10  # rounds with drafting ahead may be this much slower before it stops
    min_samples: int = 3  # rounds of each kind needed before deciding
    weight: float = 0.3  # of the newest round in each moving average

    def __post_init__(self):
        self.rounds = 0
        self.with_ahead: list[float] = [0.0, 0]  # [moving ratio, samples]
        self.without: list[float] = [0.0, 0]
        self.enabled = True

    def allow(self) -> bool:
        """Whether this round may draft ahead."""
        self.rounds += 1
        return self.enabled and self.rounds % self.probe_every != 0

    def observe(self, drafted_ahead: bool, compute_s: float, predicted_s: float) -> None:
        if predicted_s <= 0 or compute_s <= 0:
            return
        stat = self.with_ahead if drafted_ahead else self.without
        ratio = compute_s / predicted_s
        stat[0] = ratio if not stat[1] else stat[0] + self.weight * (ratio - stat[0])
        stat[1] += 1
        if self.with_ahead[1] >= self.min_samples and self.without[1] >= self.min_samples:
            self.enabled = self.with_ahead[0] <= self.without[0] * (1 + self.tolerance)
