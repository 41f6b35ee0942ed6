"""Speculative-decoding verification (hat.device.acceptance): exact greedy rule, statistically lossless sampling.

Losslessness oracle: drafting from q and verifying against the target must emit tokens distributed exactly
as the target's own sampling distribution p. Each statistical test runs thousands of seeded (deterministic)
draft-and-verify trials and checks the emitted tokens against p with Pearson's chi-square test; the same
test must reject deliberately broken rules, which shows it has the power to catch a wrong rule.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from hat.common.sampling import SamplingParams, token_distribution
from hat.device.acceptance import Verdict, verify, verify_greedy, verify_sampling

Rule = Callable[[list[int], torch.Tensor, torch.Tensor, SamplingParams, torch.Generator], Verdict]

TRIALS = 20_000
POWER_TRIALS = 2_000  # a broken rule must fail even with a tenth of the trials (its statistic grows ~N)
SAMPLE = SamplingParams(temperature=1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The trials are many calls on tiny tensors: intra-op threads only add synchronisation
    (measured 10x slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df), exact closed forms of the regularized upper incomplete gamma Q(df/2, x/2).

    Even df = 2m: exp(-y) sum_{j<m} y^j / j!.  Odd df = 2m + 1: erfc(sqrt(y)) + exp(-y) sum_{j<m} y^(j+1/2) / G(j+3/2).
    """
    y = x / 2
    if y <= 0:
        return 1.0
    if df % 2 == 0:
        return sum(math.exp(-y + j * math.log(y) - math.lgamma(j + 1)) for j in range(df // 2))
    return math.erfc(math.sqrt(y)) + sum(math.exp(-y + (j + 0.5) * math.log(y) - math.lgamma(j + 1.5))
                                         for j in range(df // 2))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit of counts against probs, over the cells with probs > 0."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert int(counts[probs == 0].sum()) == 0, "a token of probability 0 was emitted"
    keep = probs > 0
    expected = counts.sum() * probs[keep] / probs[keep].sum()
    assert float(expected.min()) >= 5, "too few expected counts for the chi-square approximation"
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


@pytest.mark.parametrize("x, df, sf", [
    (3.841459, 1, 0.05), (13.815511, 2, 0.001), (16.266236, 3, 0.001), (9.487729, 4, 0.05),
    (11.070498, 5, 0.05), (30.577914, 15, 0.01), (0.0, 5, 1.0),
])
def test_chi2_sf_matches_table(x, df, sf):
    assert chi2_sf(x, df) == pytest.approx(sf, rel=1e-4)


# --- broken rules: the statistical tests must reject them -------------------------------------------------

def resample_from_target(draft_tokens, draft_probs, target_logits, params, generator) -> Verdict:
    """Wrong: on rejection draws from p instead of the residual max(0, p - q) (biased towards q's tokens)."""
    p = token_distribution(target_logits, params)
    for i, d in enumerate(draft_tokens):
        if float(torch.rand(1, generator=generator)) >= float(p[i, d]) / float(draft_probs[i, d]):
            return Verdict(i, int(torch.multinomial(p[i], 1, generator=generator)))
    return Verdict(len(draft_tokens), int(torch.multinomial(p[-1], 1, generator=generator)))


def always_accept(draft_tokens, draft_probs, target_logits, params, generator) -> Verdict:
    """Wrong: emits the draft's distribution q."""
    return Verdict(len(draft_tokens), int(torch.argmax(target_logits[-1])))


# --- greedy ------------------------------------------------------------------------------------------------

def one_hot_logits(best: list[int], vocab: int = 5) -> torch.Tensor:
    """Rows of random logits whose argmax is best[i]."""
    logits = torch.randn(len(best), vocab, generator=torch.Generator().manual_seed(len(best)))
    logits[torch.arange(len(best)), best] = 10.0
    return logits


@pytest.mark.parametrize("draft, best, accepted, next_token", [
    ([1, 2, 3], [1, 2, 3, 4], 3, 4),  # all accepted: bonus = argmax of the last row
    ([0, 2, 3], [1, 2, 3, 4], 0, 1),  # mismatch at 0
    ([1, 2, 0], [1, 2, 3, 4], 2, 3),  # mismatch in the middle: later rows are ignored
    ([1, 4, 3], [1, 2, 3, 4], 1, 2),
    ([], [3], 0, 3),  # empty draft: plain greedy decoding
])
def test_greedy(draft, best, accepted, next_token):
    logits = one_hot_logits(best)
    assert verify_greedy(draft, logits) == Verdict(accepted, next_token)
    assert verify(draft, None, logits, SamplingParams(), None) == Verdict(accepted, next_token)


def test_greedy_ignores_mismatch_after_first():
    """Only the first mismatch counts, even when a later draft token matches its row."""
    logits = one_hot_logits([0, 1, 2, 3])
    assert verify_greedy([0, 3, 2], logits) == Verdict(1, 1)


# --- sampling: statistical losslessness --------------------------------------------------------------------

def random_dist(shape: tuple[int, ...], seed: int, scale: float = 0.8) -> torch.Tensor:
    return torch.softmax(scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


VOCAB1 = 6
P1 = random_dist((VOCAB1,), seed=11)  # target
Q1 = random_dist((VOCAB1,), seed=12)  # draft


def emit_single(rule: Rule, trials: int, logits: torch.Tensor, q: torch.Tensor, params: SamplingParams,
                seed: int = 0) -> torch.Tensor:
    """Counts of the first emitted token over trials of drafting one token from q and verifying it."""
    drafts = torch.multinomial(q, trials, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist()
    target_logits, draft_probs = torch.stack([logits, logits]), q[None]
    gen = torch.Generator().manual_seed(seed + 1)
    counts = torch.zeros(len(q), dtype=torch.long)
    for d in drafts:
        v = rule([d], draft_probs, target_logits, params, gen)
        counts[d if v.accepted == 1 else v.next_token] += 1
    return counts


def test_single_position_is_lossless():
    assert (P1 - Q1).abs().sum() > 0.5  # the draft is far from the target: many rejections
    assert chi2_pvalue(emit_single(verify_sampling, TRIALS, P1.log(), Q1, SAMPLE), P1) > 1e-3


@pytest.mark.parametrize("rule", [resample_from_target, always_accept])
def test_single_position_detects_broken_rule(rule):
    assert chi2_pvalue(emit_single(rule, POWER_TRIALS, P1.log(), Q1, SAMPLE), P1) < 1e-6


VOCAB2 = 4
P_X1, P_X2 = random_dist((VOCAB2,), 21), random_dist((VOCAB2, VOCAB2), 22)  # target p(x1), p(x2 | x1)
Q_X1, Q_X2 = random_dist((VOCAB2,), 23), random_dist((VOCAB2, VOCAB2), 24)  # draft q(x1), q(x2 | x1)
P_X3 = random_dist((VOCAB2,), 25)  # the bonus row: any fixed distribution


def emit_pair(rule: Rule, trials: int, seed: int = 0) -> torch.Tensor:
    """Counts [x1, x2] of the first two emitted tokens over trials of drafting two tokens and verifying them."""
    g = torch.Generator().manual_seed(seed)
    d1 = torch.multinomial(Q_X1, trials, replacement=True, generator=g)
    d2 = torch.multinomial(Q_X2[d1], 1, generator=g).squeeze(1)
    completion = torch.multinomial(P_X2, trials, replacement=True, generator=g)  # [x1, trial]: x2 ~ p(x2 | x1)
    target_logits = [torch.stack([P_X1, P_X2[x1], P_X3]).log() for x1 in range(VOCAB2)]
    draft_probs = [torch.stack([Q_X1, Q_X2[x1]]) for x1 in range(VOCAB2)]
    gen = torch.Generator().manual_seed(seed + 1)
    counts = torch.zeros(VOCAB2, VOCAB2, dtype=torch.long)
    for t, (a, b) in enumerate(zip(d1.tolist(), d2.tolist())):
        v = rule([a, b], draft_probs[a], target_logits[a], SAMPLE, gen)
        if v.accepted == 0:
            x1, x2 = v.next_token, int(completion[v.next_token, t])
        else:
            x1, x2 = a, (v.next_token if v.accepted == 1 else b)
        counts[x1, x2] += 1
    return counts


def test_two_positions_are_lossless():
    assert chi2_pvalue(emit_pair(verify_sampling, TRIALS), P_X1[:, None] * P_X2) > 1e-3


@pytest.mark.parametrize("rule", [resample_from_target, always_accept])
def test_two_positions_detect_broken_rule(rule):
    assert chi2_pvalue(emit_pair(rule, POWER_TRIALS), P_X1[:, None] * P_X2) < 1e-6


def test_temperature_and_top_p():
    """Output ~ the tempered nucleus (computed here by hand); tokens outside it are never emitted."""
    params = SamplingParams(temperature=0.7, top_p=0.5)
    logits = torch.tensor([0.5, 2.0, -1.0, 1.2, 1.5, 0.0, -0.5, 1.0])
    weights = [math.exp(x / 0.7) for x in logits.tolist()]
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    nucleus, mass = [], 0.0
    for i in order:  # smallest set of most likely tokens whose probability reaches top_p
        nucleus.append(i)
        mass += weights[i] / sum(weights)
        if mass >= params.top_p:
            break
    expected = torch.zeros(len(weights), dtype=torch.float64)
    expected[nucleus] = torch.tensor([weights[i] for i in nucleus], dtype=torch.float64)
    expected /= expected.sum()
    assert 1 < len(nucleus) < len(weights)
    assert torch.allclose(token_distribution(logits, params).double(), expected, atol=1e-6)

    uniform = torch.full((len(weights),), 1 / len(weights))  # the draft proposes every token, nucleus or not
    counts = emit_single(verify_sampling, 5_000, logits, uniform, params, seed=5)
    assert counts[expected == 0].sum() == 0
    assert chi2_pvalue(counts, expected) > 1e-3


# --- sampling: exact cases ---------------------------------------------------------------------------------

def test_draft_equal_to_target_is_always_accepted():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    logits[3, 5] = 50.0  # the bonus row is (numerically) one-hot
    q = token_distribution(logits[:3], SAMPLE)
    gen = torch.Generator().manual_seed(0)
    for draft in ([0, 1, 2], [6, 6, 6], [2, 5, 4]):
        assert verify_sampling(draft, q, logits, SAMPLE, gen) == Verdict(3, 5)


def test_token_the_draft_cannot_produce_is_rejected():
    """q[d] == 0 (an inconsistent draft) is a rejection, whatever p[d] is."""
    logits = torch.zeros(2, 4)
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert all(verify_sampling([0], q, logits, SAMPLE, gen).accepted == 0 for _ in range(50))


def test_empty_residual_falls_back_to_target():
    """p == q with p[d] == q[d] == 0: rejected, the residual is all 0, so the next token comes from p."""
    logits = torch.tensor([[0.0, 1.0, float("-inf"), 0.5], [0.0, 0.0, 0.0, 0.0]])
    q = token_distribution(logits[:1], SAMPLE)
    gen = torch.Generator().manual_seed(0)
    tokens = set()
    for _ in range(50):
        v = verify_sampling([2], q, logits, SAMPLE, gen)
        assert v.accepted == 0
        tokens.add(v.next_token)
    assert tokens == {0, 1, 3}


def test_empty_draft_samples_row_zero():
    logits = torch.tensor([[0.0, 40.0, 0.0]])
    assert verify_sampling([], torch.zeros(0, 3), logits, SAMPLE, torch.Generator().manual_seed(0)) == Verdict(0, 1)


def test_seeded_generator_is_deterministic_and_verify_dispatches():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(7))
    q = random_dist((3, 9), seed=8)
    draft = [1, 4, 7]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=42)
    gen_a, gen_b = params.make_generator(), params.make_generator()
    runs = [verify(draft, q, logits, params, gen_a) for _ in range(30)]
    again = [verify_sampling(draft, q, logits, params, gen_b) for _ in range(30)]
    assert runs == again
    assert len({(v.accepted, v.next_token) for v in again}) > 1  # the generator advances between calls


# --- shapes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("draft, q_shape, logits_shape", [
    ([1, 2], (2, 5), (2, 5)),  # target rows != len(draft) + 1
    ([1, 2], (2, 5), (4, 5)),
    ([1, 2], (1, 5), (3, 5)),  # draft_probs rows != len(draft)
    ([1, 2], (2, 6), (3, 5)),  # vocab widths differ
    ([1, 2], (2, 5), (15,)),  # target_logits not 2-D
    ([1, 5], (2, 5), (3, 5)),  # draft token outside the vocabulary
    ([], (0, 5), (0, 5)),  # empty draft still needs the row for the next token
])
def test_shape_errors(draft, q_shape, logits_shape):
    q, logits = torch.full(q_shape, 0.2), torch.zeros(logits_shape)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        verify_sampling(draft, q, logits, SAMPLE, gen)
    with pytest.raises(ValueError):
        verify(draft, q, logits, SamplingParams(), None)
    if q_shape[0] == len(draft) and q_shape[1] == 5:  # greedy never looks at draft_probs
        with pytest.raises(ValueError):
            verify_greedy(draft, logits)


def test_sampling_needs_draft_probs_and_temperature():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        verify([1], None, logits, SAMPLE, torch.Generator())
    with pytest.raises(ValueError):
        verify_sampling([1], torch.full((1, 3), 1 / 3), logits, SamplingParams(), torch.Generator())
