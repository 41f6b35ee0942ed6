"""Chunk planning against a real emulated link: the device learns the link from its own traffic and
re-plans a prompt whose plan assumed a much faster link, with output identical to an unchunked prefill."""
from __future__ import annotations

import pytest

from hat.device.chunk_planner import ChunkingConfig, ChunkPlanner
from hat.device.link_estimator import LinkEstimator
from hat.testbed.link_shim import LinkProfile, LinkShim

from tests.cluster import running_cloud

UPLINK, DOWNLINK, RTT = 400e3, 600e3, 0.01  # bytes/s, bytes/s, s: slow enough that transfers dominate
PROMPT_TOKENS = 160


@pytest.fixture(scope="module")
def slow_link(tiny_checkpoint, tmp_path_factory):
    """A cloud behind a LinkShim, and a generator that talks to it through the shim."""
    with running_cloud(tiny_checkpoint("llama3"), 2, 1, tmp_path_factory.mktemp("replan")) as cluster, \
            LinkShim(cluster.server.data_address, LinkProfile(UPLINK, DOWNLINK, RTT)) as shim, \
            cluster.generator(data_port=shim.port) as gen:
        yield gen


def _prompt(gen) -> list[int]:
    return [(7 * i + 3) % (gen.model.spec.vocab_size - 10) + 5 for i in range(PROMPT_TOKENS)]


def test_a_wrong_link_prior_is_corrected_during_the_prompt(slow_link):
    """A plan made for a link 1000x slower (many small chunks) is re-planned once replies show the real rate."""
    gen = slow_link
    prompt = _prompt(gen)
    gen.prefill.config = ChunkingConfig(enabled=False)
    whole = gen.generate_ids(prompt, 4)
    gen.prefill.estimator = gen.link_estimator = LinkEstimator(UPLINK / 1000, DOWNLINK / 1000, RTT)
    config = ChunkingConfig(max_in_flight=2, shared_host=False)  # the shim emulates a remote cloud
    gen.prefill.config = config
    first_plan = ChunkPlanner(config).plan(PROMPT_TOKENS, gen.prefill.costs(), PROMPT_TOKENS)
    chunked = gen.generate_ids(prompt, 4)
    assert chunked.token_ids == whole.token_ids
    assert chunked.replans >= 1, chunked.chunks
    assert sum(chunked.chunks) == PROMPT_TOKENS
    assert tuple(chunked.chunks) != first_plan.sizes
    assert chunked.ttft_ms < first_plan.predicted_s * 1000 / 10  # the first plan expected a link 1000x slower


def test_the_estimated_link_matches_the_emulated_one(slow_link):
    """After a few chunked prompts the uplink and downlink estimates are within 25% of the emulator's rates."""
    gen = slow_link
    gen.prefill.config = ChunkingConfig(fixed_size=32)
    for attempt in range(3):  # a burst of noise on this shared machine can spoil one prompt's samples
        for _ in range(3):
            gen.generate_ids(_prompt(gen), 2)
        estimate = gen.link_estimator.estimate
        close = (estimate.uplink_bytes_per_s == pytest.approx(UPLINK, rel=0.25)
                 and estimate.downlink_bytes_per_s == pytest.approx(DOWNLINK, rel=0.25)
                 and RTT * 0.8 <= estimate.rtt_s <= RTT + 0.02)
        if close:
            break
    assert close, estimate


def test_the_prediction_tracks_the_measured_time(slow_link):
    """Once the link is learnt, the plan's predicted time to first token is within 30% of the measured one."""
    gen = slow_link
    gen.prefill.config = ChunkingConfig(shared_host=False)  # the shim emulates a remote cloud
    for _ in range(2):
        gen.generate_ids(_prompt(gen), 1)
    for attempt in range(3):  # beside a busy loop, a burst of noise spoiled a whole attempt (ratios 0.80, 1.50, 1.90)
        results = [gen.generate_ids(_prompt(gen), 1) for _ in range(3)]
        assert all(len(r.chunks) > 1 for r in results)
        # the median of three: one prompt hit by a burst of machine noise does not decide it
        ratios = sorted(r.ttft_predicted_ms / r.ttft_ms for r in results)
        if ratios[1] == pytest.approx(1.0, rel=0.3):
            break
    assert ratios[1] == pytest.approx(1.0, rel=0.3), ratios
