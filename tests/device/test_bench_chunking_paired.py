"""scripts/bench_chunking.py's paired ratio: each prompt's adaptive time against the least baseline time on the same
prompt, the median over prompts; the machine's drift between prompts cancels, where the medians' ratio keeps it."""
from __future__ import annotations

import statistics

import pytest

from script_loader import load_script


def test_the_same_cut_on_a_drifting_machine_is_paired_at_one():
    bench = load_script("bench_chunking")
    # the machine slows down prompt after prompt; adaptive and "none" are the same cut, each prompt's pair 1% apart
    none = [100.0, 140.0, 200.0, 260.0, 300.0]
    adaptive = [101.0, 139.0, 202.0, 258.0, 303.0]
    fixed = [150.0, 90.0, 300.0, 390.0, 450.0]
    assert bench.paired_ratio(adaptive, [none, fixed]) == pytest.approx(statistics.median(
        [a / min(n, f) for a, n, f in zip(adaptive, none, fixed)]))
    assert bench.paired_ratio(adaptive, [none]) == pytest.approx(1.0, abs=0.011)
    # unpaired, a cell whose modes' runs fell on different stretches of the drift looks 2x apart
    assert statistics.median(adaptive[2:]) / statistics.median(none[:3]) > 1.8


def test_a_faster_baseline_on_a_prompt_counts_against_adaptive():
    bench = load_script("bench_chunking")
    assert bench.paired_ratio([100.0, 100.0, 100.0], [[100.0] * 3, [80.0, 80.0, 120.0]]) == pytest.approx(1.25)


def test_modes_timed_on_different_prompts_are_refused():
    bench = load_script("bench_chunking")
    with pytest.raises(ValueError, match="same prompts"):
        bench.paired_ratio([100.0, 100.0], [[100.0]])
    with pytest.raises(ValueError, match="same prompts"):
        bench.paired_ratio([], [[]])
