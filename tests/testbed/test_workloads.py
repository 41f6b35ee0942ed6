"""Workloads from the reference corpus: prompt lengths shaped like SpecBench and CNN/DailyMail (their mean and
p90), prompts cut from held-out files, Poisson arrivals."""
from __future__ import annotations

import math
import random
import statistics

import pytest
from transformers import AutoTokenizer

from hat.common.default_model import reference_model_dir
from hat.testbed.workloads import (CNN_DAILYMAIL, SPECBENCH, LengthShape, build_workload, heldout_token_pool,
                                   prompt_lengths, weibull_for)


KS_CRITICAL_001 = 1.95  # Kolmogorov-Smirnov: sqrt(n) * D beyond this rejects at the 0.1% level


def ks_statistic(sample: list[float], cdf) -> float:
    """sqrt(n) times the largest gap between the sample's empirical CDF and `cdf`."""
    xs = sorted(sample)
    n = len(xs)
    gap = max(max(abs((i + 1) / n - cdf(x)), abs(i / n - cdf(x))) for i, x in enumerate(xs))
    return math.sqrt(n) * gap


@pytest.mark.parametrize("shape", [SPECBENCH, CNN_DAILYMAIL], ids=lambda s: s.name)
def test_the_weibull_fit_has_the_datasets_mean_and_p90_exactly(shape):
    k, scale = shape.weibull()
    assert scale * math.gamma(1 + 1 / k) == pytest.approx(shape.mean, rel=1e-9)
    assert scale * math.log(10) ** (1 / k) == pytest.approx(shape.p90, rel=1e-9)  # F(p90) = 0.9


@pytest.mark.parametrize("shape", [SPECBENCH, CNN_DAILYMAIL], ids=lambda s: s.name)
def test_drawn_lengths_match_the_dataset_within_3_percent(shape):
    """20000 draws (no clipping): sample mean and p90 within 3% of the dataset's; a KS test does not reject the fitted
    Weibull (rounding to whole tokens aside)."""
    lengths, clipped = prompt_lengths(shape, 20000, random.Random(7), max_prompt_tokens=10 ** 9)
    assert clipped == 0
    assert statistics.fmean(lengths) == pytest.approx(shape.mean, rel=0.03)
    assert sorted(lengths)[int(0.9 * len(lengths))] == pytest.approx(shape.p90, rel=0.03)
    k, scale = shape.weibull()

    def survival(x: float) -> float:
        return math.exp(-((x / scale) ** k))

    # the fitted Weibull conditioned on lengths over 50 (rounding to whole tokens matters below), evaluated at
    # half-token boundaries as the rounded draws imply; a KS test does not reject it
    tail = [n for n in lengths if n > 50]
    assert ks_statistic(tail, lambda x: 1 - survival(x + 0.5) / survival(50.5)) < KS_CRITICAL_001


def test_lognormal_cannot_fit_specbench_but_weibull_can():
    assert math.log(SPECBENCH.p90 / SPECBENCH.mean) > 1.2816 ** 2 / 2  # above any lognormal's p90/mean
    weibull_for(SPECBENCH.mean, SPECBENCH.p90)


@pytest.mark.parametrize("mean, p90", [(0, 10), (10, 5), (10, 10), (-1, 3), (10, 30)])  # 3.0: past any Weibull
def test_impossible_shapes_are_refused(mean, p90):
    with pytest.raises(ValueError):
        weibull_for(mean, p90)


@pytest.fixture(scope="module")
def tokenizer_and_pool():
    tokenizer = AutoTokenizer.from_pretrained(str(reference_model_dir()), local_files_only=True)
    return tokenizer, heldout_token_pool(tokenizer, limit=60_000)


def test_workload_prompts_are_held_out_code_of_the_drawn_lengths(tokenizer_and_pool):
    """Every prompt is a contiguous window of the held-out pool of its drawn length (clipped to the model's
    context); arrivals increase; the same seed gives the same workload and another seed another one."""
    tokenizer, pool = tokenizer_and_pool
    requests, summary = build_workload(tokenizer, CNN_DAILYMAIL, 60, 6.0, seed=3, max_prompt_tokens=1000, pool=pool)
    joined = [t for _, ids in pool for t in ids]
    text = tokenizer.decode(joined)
    for request in requests:
        assert 8 <= len(request.prompt_ids) <= 1000 and request.max_new_tokens == 128
        offset = int(request.source.rsplit("@", 1)[1])
        assert list(request.prompt_ids) == joined[offset:offset + len(request.prompt_ids)]
        assert tokenizer.decode(list(request.prompt_ids[:20])) in text
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    assert summary.clipped > 0 and summary.p90_tokens == 1000  # CNN/DailyMail's tail is past a 1000-token context
    again, _ = build_workload(tokenizer, CNN_DAILYMAIL, 60, 6.0, seed=3, max_prompt_tokens=1000, pool=pool)
    other, _ = build_workload(tokenizer, CNN_DAILYMAIL, 60, 6.0, seed=4, max_prompt_tokens=1000, pool=pool)
    assert again == requests and other != requests


def test_arrivals_are_poisson_at_the_given_rate(tokenizer_and_pool):
    """Gaps between arrivals: exponential with mean 1/rate (KS test), the mean within 5% over 2000 arrivals."""
    tokenizer, pool = tokenizer_and_pool
    requests, summary = build_workload(tokenizer, LengthShape("tiny", 20, 40), 2000, 4.0, seed=1, pool=pool)
    gaps = [requests[0].arrival_s] + [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    assert ks_statistic(gaps, lambda x: 1 - math.exp(-x / 0.25)) < KS_CRITICAL_001
    assert summary.rate_per_s == pytest.approx(4.0, rel=0.05)


def test_bad_workloads_are_refused(tokenizer_and_pool):
    tokenizer, pool = tokenizer_and_pool
    with pytest.raises(ValueError, match="rate"):
        build_workload(tokenizer, SPECBENCH, 5, 0.0, pool=pool)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        build_workload(tokenizer, SPECBENCH, 5, 1.0, max_prompt_tokens=4, pool=pool)
