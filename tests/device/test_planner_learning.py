"""The chunk planner against its own cost model (hat.device.chunk_planner, hat.common.prefill_pipeline): it never
predicts itself worse than the whole prompt or any fixed size; a re-plan counts the chunks in flight; device and
cloud on the same cores take turns; and the misprediction model (hat.device.misprediction) learns what the
model left out."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest

from hat.common.cost_fit import LinearCost, attended
from hat.common.prefill_pipeline import prefill_lower_bound, simulate_prefill
from hat.device.chunk_planner import (FIXED_SIZES, WHOLE_PROMPT_MARGIN, ChunkingConfig, ChunkPlanner, even_cut,
                                     fixed_cut)
from hat.device.generator import PROBE_WHOLE
from hat.device.misprediction import MispredictionModel

from tests.device.test_chunk_planner import TYPICAL, random_cases


@pytest.mark.parametrize("seed", range(4))
def test_the_plan_is_never_predicted_worse_than_the_trivial_cuts(seed):
    """For random costs, the adaptive plan's prediction is at most the whole prompt's and, but for the margin it
    gives the whole prompt, every fixed size's (under the same model, so the trivial choices are among its
    candidates); it cuts the prompt only for a gain beyond that margin."""
    for tokens, max_chunk, costs, in_flight, start in random_cases(seed, 40):
        config = ChunkingConfig(max_in_flight=in_flight)
        planner = ChunkPlanner(config)
        plan = planner.plan(tokens, costs, max_chunk, start)
        assert sum(plan.sizes) == tokens and max(plan.sizes) <= max_chunk
        whole = planner.evaluate(even_cut(tokens, math.ceil(tokens / max_chunk)), costs, start)
        assert plan.predicted_s <= whole.predicted_s + 1e-12
        if plan.sizes != whole.sizes and len(whole.sizes) == 1:
            assert plan.predicted_s * (1 + WHOLE_PROMPT_MARGIN) < whole.predicted_s
        for size in FIXED_SIZES:
            if config.min_chunk <= size < min(tokens, max_chunk + 1) and math.ceil(tokens / size) <= config.max_chunks:
                fixed = planner.evaluate(fixed_cut(tokens, size), costs, start).predicted_s
                assert plan.predicted_s <= fixed * (1 + WHOLE_PROMPT_MARGIN) + 1e-12


def test_a_replan_counts_the_chunks_in_flight():
    """Mid-prompt, with three 192-token chunks holding the link and the cloud, the rest of the prompt is not ramped
    up from the smallest chunk again (the pipeline is already full), and its prediction includes their wait."""
    costs = dataclasses.replace(TYPICAL, uplink_bytes_per_s=5e6, downlink_bytes_per_s=7.5e6)
    planner = ChunkPlanner()
    fresh = planner.plan(1024, costs, 4096, start=576)
    assert fresh.sizes[0] == ChunkingConfig().min_chunk  # an empty pipeline: a ramp from the smallest chunk
    busy = planner.plan(1024, costs, 4096, start=576, in_flight=(192, 192, 192))
    assert busy.sizes[0] > ChunkingConfig().min_chunk, busy.sizes
    assert busy.predicted_s > fresh.predicted_s
    # the prediction is the simulation with the in-flight chunks ahead of the new ones
    assert busy.predicted_s == pytest.approx(simulate_prefill(list(busy.sizes), costs, 8, 576, (192, 192, 192)).ttft_s)


def test_in_flight_chunks_are_the_same_as_chunks_sent_at_time_zero():
    """A chunk in flight costs the link and the cloud what it would if just sent, and no device input time."""
    free_input = dataclasses.replace(TYPICAL, device_input=LinearCost(0.0, 0.0, 0.0))
    together = simulate_prefill([64, 128, 256], free_input, 8, 0).ttft_s
    assert simulate_prefill([256], free_input, 8, 192, in_flight=(64, 128)).ttft_s == pytest.approx(together)


def test_shared_cores_make_compute_take_turns():
    """With the device and the cloud on the same cores, any cut takes at least all the compute added up, and
    over loopback (a link with nothing to hide) the planner keeps the prompt whole where separate hardware would
    pipeline it."""
    costs = dataclasses.replace(TYPICAL, uplink_bytes_per_s=1e12, downlink_bytes_per_s=1e12, rtt_s=1e-4,
                                cloud=LinearCost(2e-3, 1e-4, 2e-10))
    shared = dataclasses.replace(costs, shared_compute=True)
    tokens = 1024
    total = sum(c.predict(tokens) for c in (costs.device_input, costs.device_output, costs.cloud))
    rng = random.Random(1)
    assert prefill_lower_bound(tokens, shared) >= total - 3 * 1e-3 - 2e-3  # the bound leaves out the bases
    for _ in range(20):
        sizes = even_cut(tokens, rng.randint(1, 32))
        assert simulate_prefill(sizes, shared, 8).ttft_s >= total * 0.999
    planner = ChunkPlanner()
    assert len(planner.plan(tokens, costs, 4096).sizes) > 1
    assert planner.plan(tokens, shared, 4096).sizes == (tokens,)


def test_the_misprediction_model_learns_and_forgets():
    """Prompts slower than predicted teach a cost per chunk after the first and per prompt (split by least squares
    over cuts of different sizes); prompts as predicted make it fade; faster ones never make it negative."""
    model = MispredictionModel()

    def predicted(chunks: int) -> float:  # the model's prediction, the current correction included
        return 0.20 + model.per_prompt_s + (chunks - 1) * model.per_chunk_s

    for _ in range(4):
        model.add(10, measured_s=0.29, predicted_s=predicted(10))  # 10 ms a chunk after the first unexplained
        model.add(1, measured_s=0.20, predicted_s=predicted(1))
    assert model.per_chunk_s == pytest.approx(0.01, rel=0.02) and model.per_prompt_s == pytest.approx(0.0, abs=1e-3)
    for _ in range(8):
        model.add(10, measured_s=0.19, predicted_s=predicted(10))  # faster than even the bare model
    assert model.per_chunk_s == 0 and model.per_prompt_s == 0
    rng = random.Random(3)
    for _ in range(8):  # noise either way around the bare model teaches next to nothing
        chunks = rng.choice([1, 4, 16])
        model.add(chunks, measured_s=0.20 + rng.uniform(-0.05, 0.05), predicted_s=predicted(chunks))
    assert model.per_prompt_s < 0.03 and model.per_chunk_s < 0.003


def test_a_prompt_missed_by_more_than_half_is_not_taught():
    """A whole prompt measured at 3x its prediction (the link not yet learned): no per-prompt cost from it, which would
    hold the next prompts' predictions 2x too high; a 20% miss is taught."""
    model = MispredictionModel()
    model.add(1, measured_s=0.30, predicted_s=0.10)
    assert model.per_prompt_s == 0.0 and model.per_chunk_s == 0.0
    model.add(1, measured_s=0.12, predicted_s=0.10)
    assert model.per_prompt_s == pytest.approx(0.02)


def test_whole_prompts_keep_their_prediction_beside_contended_chunked_ones():
    """Shared cores: whole prompts run as predicted, chunked ones slower by a cost that grows less than linearly with
    the chunks (the second chunk's overlap costs most). The whole prompts set the per-prompt cost (none here), the
    chunked ones a per-chunk cost, the median of theirs (0.19 / 1, 0.25 / 3, 0.40 / 31): the whole prompt's
    prediction stays right, and the few-chunk cuts are not drowned by the many-chunk one."""
    model = MispredictionModel()
    contention = {1: 0.0, 2: 0.19, 4: 0.25, 32: 0.40}  # seconds beyond the bare model, per cut's chunks
    for _ in range(2):
        for chunks, extra in contention.items():
            model.add(chunks, 0.6 + extra, 0.6 + model.per_prompt_s + model.per_chunk_s * (chunks - 1))
    assert model.per_prompt_s == pytest.approx(0.0, abs=1e-9)
    assert model.per_chunk_s == pytest.approx(0.25 / 3, rel=1e-6)


def test_a_learned_overhead_per_chunk_moves_the_plan_to_fewer_chunks():
    """After chunked prompts ran slower than predicted, the planner's next cut has fewer chunks, and its prediction
    for the cut that mispredicted is now the measured time."""
    costs = dataclasses.replace(TYPICAL, uplink_bytes_per_s=2e8, downlink_bytes_per_s=2e8, rtt_s=1e-3)
    planner = ChunkPlanner()
    before = planner.plan(1024, costs, 4096)
    assert len(before.sizes) > 2
    model = MispredictionModel()
    whole = planner.evaluate([1024], costs, 0)
    extra = len(before.sizes) - 1
    for _ in range(2):  # the chosen cut ran 20 ms a chunk after the first slower than predicted, the whole as predicted
        model.add(len(before.sizes), before.predicted_s + 0.02 * extra,
                  before.predicted_s + model.per_prompt_s + model.per_chunk_s * extra)
        model.add(1, whole.predicted_s, whole.predicted_s + model.per_prompt_s)
    measured = before.predicted_s + 0.02 * extra
    learned = dataclasses.replace(costs, chunk_overhead_s=model.per_chunk_s, prompt_overhead_s=model.per_prompt_s)
    assert planner.evaluate(list(before.sizes), learned, 0).predicted_s == pytest.approx(measured, rel=0.1)
    assert len(planner.plan(1024, learned, 4096).sizes) < len(before.sizes)


def test_a_learned_overhead_per_chunk_counts_where_the_device_is_not_the_bottleneck():
    """The per-chunk overhead is learned as time to the first token per chunk after the first, and is added so: with
    the cloud the bottleneck (as the reference model over a 10 MB/s link), a cut's prediction grows by exactly the
    overhead per later chunk, where as device time it was hidden behind the cloud and many chunks kept looking
    cheap; and the next plan has fewer chunks."""
    costs = dataclasses.replace(TYPICAL, cloud=LinearCost(5e-3, 4e-4, 2e-10), uplink_bytes_per_s=1e7,
                                downlink_bytes_per_s=1.5e7, rtt_s=0.02, up_bytes_per_token=1024,
                                down_bytes_per_token=1024)
    planner = ChunkPlanner()
    before = planner.plan(2048, costs, 4096)
    assert len(before.sizes) > 2
    learned = dataclasses.replace(costs, chunk_overhead_s=0.01)
    assert planner.evaluate(list(before.sizes), learned, 0).predicted_s == \
        pytest.approx(before.predicted_s + 0.01 * (len(before.sizes) - 1), rel=1e-9)
    assert len(planner.plan(2048, learned, 4096).sizes) < len(before.sizes)


def test_the_probe_measures_the_path_before_the_first_prompt(tiny_checkpoint, tmp_path):
    """SplitGenerator.probe() (cold start): afterwards the link estimator has measured both offsets and the uplink
    (no longer its 20 ms prior round trip), the cloud tracker has its ratio from replies, the device's fits hold the
    probe's chunks, the session is closed on the cloud, and the first prompt still equals an unprobed device's."""
    from tests.cluster import running_cloud

    prompt = [(11 * i + 5) % 200 + 3 for i in range(96)]
    with running_cloud(tiny_checkpoint("llama3"), 2, 1, tmp_path) as cluster:
        with cluster.generator() as plain:
            want = plain.generate_ids(prompt, 4).token_ids
        with cluster.generator() as gen:
            fitted = len(gen.prefill.profile.input)
            gen.probe()
            estimator = gen.link_estimator
            assert estimator.up.offset_s is not None and estimator.up.samples > 0
            assert estimator.rtt_s != estimator.prior_rtt_s
            assert gen.prefill.cloud._ratio_samples > 0
            assert len(gen.prefill.profile.input) > fitted
            whole = min(PROBE_WHOLE, gen.max_context // 2, gen.max_message_tokens)  # and a scratch prompt sent whole
            cloud_timed = [(t, pairs) for timings in gen.prefill.cloud._own_fit.size_classes()
                           for t, pairs, _ in timings]
            assert (whole, attended(whole, 0)) in cloud_timed
            assert gen.prefill.config.max_in_flight == ChunkingConfig().max_in_flight  # restored
            assert gen.link.stats().sessions == 0
            assert gen.generate_ids(prompt, 4).token_ids == want


def test_the_probes_warmup_passes_run_and_are_not_learned_from(tiny_checkpoint, tmp_path):
    """probe(warmups=n) runs its largest forward, the whole scratch prompt, n more times through the cloud and closes
    every session, yet the device learns from the last pass only: the cloud fit, the device's input fit and the link
    estimator hold what a probe without warm-ups leaves them."""
    from tests.cluster import running_cloud

    with running_cloud(tiny_checkpoint("llama3"), 2, 1, tmp_path) as cluster:
        learned, tokens = {}, {}
        for warmups in (0, 2):
            with cluster.generator() as gen:
                fitted, before = len(gen.prefill.profile.input), cluster.server.stats.forward_tokens
                gen.probe(warmups=warmups)
                tokens[warmups] = cluster.server.stats.forward_tokens - before
                whole = min(PROBE_WHOLE, gen.max_context // 2, gen.max_message_tokens)
                learned[warmups] = (len(gen.prefill.cloud._own_fit), len(gen.prefill.profile.input) - fitted,
                                    gen.link_estimator.up.samples, gen.prefill.cloud._ratio_samples)
                assert gen.link.stats().sessions == 0
        assert tokens[2] == tokens[0] + 2 * whole and tokens[0] > whole
        assert learned[2] == learned[0]
        assert learned[0][0] > 0 and learned[0][1] > 0


@pytest.mark.parametrize("shared, in_flight, timed", [(True, 8, 0), (True, 1, 4), (False, 8, 4)])
def test_on_shared_cores_only_a_chunk_out_while_the_device_idled_times_the_cloud(tiny_checkpoint, tmp_path, monkeypatch,
                                                                                 shared, in_flight, timed):
    """Device and cloud on the same cores: a chunk's cloud time counts only if the device computed nothing while it
    was out. Four chunks, replies never taken early: with 8 in flight the device runs the next chunk's input or an
    earlier reply's output beside every one (no cloud timing kept); one at a time, each chunk is alone (all four
    kept); a remote cloud (not shared) keeps all four either way."""
    from tests.cluster import running_cloud

    prompt = [(7 * i + 3) % 200 + 3 for i in range(64)]
    with running_cloud(tiny_checkpoint("llama3"), 2, 1, tmp_path) as cluster:
        with cluster.generator() as gen:
            gen.prefill.config = ChunkingConfig(fixed_size=16, max_in_flight=in_flight, shared_host=shared)
            monkeypatch.setattr(gen.link, "reply_ready", lambda: False)
            before = len(gen.prefill.cloud._own_fit)
            result = gen.generate_ids(prompt, 1)
            assert list(result.chunks) == [16] * 4
            assert len(gen.prefill.cloud._own_fit) - before == timed


def test_the_misprediction_model_learns_from_the_whole_prefill(tiny_checkpoint, tmp_path, monkeypatch):
    """What a prompt took, as the misprediction model is told, is its whole prefill (first chunk's input part to the
    last reply's output part): most of the measured time to the first token, for a cut into many chunks too."""
    from tests.cluster import running_cloud

    prompt = [(5 * i + 1) % 200 + 3 for i in range(96)]
    with running_cloud(tiny_checkpoint("llama3"), 2, 1, tmp_path) as cluster:
        with cluster.generator() as gen:
            told = []
            monkeypatch.setattr(gen.prefill.misprediction, "add",
                                lambda chunks, measured_s, predicted_s: told.append((chunks, measured_s)))
            gen.prefill.config = ChunkingConfig(fixed_size=16, max_in_flight=1)
            result = gen.generate_ids(prompt, 1)
            assert told[-1][0] == 6
            assert 0.7 * result.ttft_ms < told[-1][1] * 1000 <= result.ttft_ms
