"""scripts/bench_chunking.py's paired ratio and mode order: per baseline, each prompt's adaptive time against the
baseline's on the same prompt, the median over prompts, the larger over baselines (the machine's drift between
prompts cancels, where the medians' ratio keeps it); the modes' order changes per prompt so that no mode always runs
after the same other mode."""
from __future__ import annotations

import itertools
import statistics
from collections import Counter

import pytest

from script_loader import load_script


def test_the_same_cut_on_a_drifting_machine_is_paired_at_one():
    bench = load_script("bench_chunking")
    # the machine slows down prompt after prompt; adaptive and "none" are the same cut, each prompt's pair 1% apart
    none = [100.0, 140.0, 200.0, 260.0, 300.0]
    adaptive = [101.0, 139.0, 202.0, 258.0, 303.0]
    fixed = [150.0, 90.0, 300.0, 390.0, 450.0]
    assert bench.paired_ratio(adaptive, [none, fixed]) == pytest.approx(max(
        statistics.median([a / n for a, n in zip(adaptive, none)]),
        statistics.median([a / f for a, f in zip(adaptive, fixed)])))
    assert bench.paired_ratio(adaptive, [none]) == pytest.approx(1.0, abs=0.011)
    # unpaired, a cell whose modes' runs fell on different stretches of the drift looks 2x apart
    assert statistics.median(adaptive[2:]) / statistics.median(none[:3]) > 1.8


def test_a_faster_baseline_counts_against_adaptive():
    bench = load_script("bench_chunking")
    assert bench.paired_ratio([100.0, 100.0, 100.0], [[100.0] * 3, [80.0, 80.0, 120.0]]) == pytest.approx(1.25)
    assert bench.paired_ratio([100.0, 100.0, 100.0], [[80.0, 80.0, 120.0], [100.0] * 3]) == pytest.approx(1.25)


def test_two_baselines_as_fast_as_adaptive_with_noise_pair_near_one():
    """Two baselines of the same time as adaptive, each with its own noise: judged one at a time the ratio stays
    near 1, where a per-prompt least of the two would put adaptive well above it."""
    bench = load_script("bench_chunking")
    adaptive = [100.0] * 8
    none = [90.0, 110.0, 95.0, 105.0, 90.0, 110.0, 95.0, 105.0]
    fixed = [110.0, 90.0, 105.0, 95.0, 110.0, 90.0, 105.0, 95.0]
    assert bench.paired_ratio(adaptive, [none, fixed]) == pytest.approx(1.0, abs=0.01)
    assert statistics.median([a / min(n, f) for a, n, f in zip(adaptive, none, fixed)]) > 1.05


def test_modes_timed_on_different_prompts_are_refused():
    bench = load_script("bench_chunking")
    with pytest.raises(ValueError, match="same prompts"):
        bench.paired_ratio([100.0, 100.0], [[100.0]])
    with pytest.raises(ValueError, match="same prompts"):
        bench.paired_ratio([], [[]])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8])
def test_every_mode_follows_every_other_equally_often(n):
    bench = load_script("bench_chunking")
    modes = {f"mode {i}": i for i in range(n)}
    rows = n if n % 2 == 0 else 2 * n
    orders = [bench.balanced_order(modes, index) for index in range(rows)]
    assert all(sorted(order) == sorted(modes) for order in orders)  # every mode once a prompt
    follows = Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert set(follows) == set(itertools.permutations(modes, 2))
    assert len(set(follows.values())) == 1  # each ordered pair equally often
    firsts = Counter(order[0] for order in orders)
    assert set(firsts) == set(modes) and len(set(firsts.values())) == 1
    assert bench.balanced_order(modes, rows) == orders[0]  # then the design repeats
