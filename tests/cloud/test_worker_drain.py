"""Draining a worker before it stops (the Ray pool's scale-down, here without Ray).

Oracle: transformers' greedy tokens, and no device ever re-sending its history (recoveries 0): every
session on the drained worker moved by KV handoff, none was lost.
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import pytest

from cluster import running_disaggregated
from eight_devices import FAMILY, K, M, NEW_TOKENS, run_concurrently, slow_rounds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DRAIN_S = 20.0  # a loaded 2-core machine moves a few tiny sessions well within this


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_drained_decode_worker_hands_its_sessions_over_and_stops_with_none_lost(eight_devices, reference,
                                                                                 tiny_checkpoint, tmp_path):
    """Six devices decode on two decode workers; while they are held between two rounds, "decode-1" (holding some
    of their sessions) is drained: it takes no new session, each of its sessions moves to "decode-0" by KV
    handoff, the router reports it drained, it stops and is dropped as retired (not lost). The devices go on:
    every one gets transformers' tokens without re-sending its history."""
    models, prompts = eight_devices
    overrides = {"disaggregation": "always", "rebalance_interval_s": 0.2}
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=2,
                               router_overrides=overrides, profile_on_start=False) as cluster, ExitStack() as stack:
        router = cluster.server
        _, keeper, leaver = cluster.workers
        gens = [stack.enter_context(cluster.generator(model, device_id=f"d{i}")) for i, model in enumerate(models[:6])]
        gate, seen = threading.Event(), {}
        gate.set()
        for gen in gens:  # each round slowed a little and held while the gate is closed
            gen.speculation = None
            slow_rounds(gen.link, gate=gate)

        def drain_when_busy():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(leaver.store) < 2:
                time.sleep(0.002)
            gate.clear()  # the devices stop at their next round, their sessions mid-run
            seen["held"] = len(leaver.store)
            router.drain.drain("decode-1")
            seen["drained"] = wait_for(lambda: router.drain.is_drained("decode-1"), DRAIN_S)
            seen["left"] = len(leaver.store)
            leaver.stop(grace_s=0.5)
            router.drain.stopped("decode-1")
            gate.set()

        handoffs = router.counters.handoffs
        drainer = threading.Thread(target=drain_when_busy, daemon=True)
        drainer.start()
        results = run_concurrently(gens, prompts[:6])
        drainer.join(DRAIN_S + 10)
        assert seen.get("held", 0) >= 2 and seen.get("drained"), seen
        assert seen["left"] == 0  # the worker itself holds nothing when the router says it is drained
        assert [r.token_ids for r in results] == reference[:6]
        assert [r.recoveries for r in results] == [0] * 6
        assert wait_for(lambda: router.table.by_name("decode-1") is None, 5)
        assert router.counters.workers_retired == 1 and router.counters.workers_lost == 0
        assert router.counters.handoff_failures == 0
        # six first moves to a decode worker, and at least the sessions decode-1 held moved again
        assert router.counters.handoffs - handoffs >= 6 + seen["held"]
        assert keeper.agent.handoffs_in >= seen["held"]


def test_a_draining_worker_takes_no_new_session_and_an_empty_one_is_drained_at_once(eight_devices, reference,
                                                                                   tiny_checkpoint, tmp_path):
    """Draining the only prefill worker while a decode worker is up: new sessions open on the decode worker
    instead; with nothing on it, the prefill worker is drained at the next round."""
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=1,
                               profile_on_start=False) as cluster:
        router = cluster.server
        prefill, decode = cluster.workers
        router.drain.drain("prefill-0")
        assert wait_for(lambda: router.drain.is_drained("prefill-0"), 5)
        assert not router.drain.is_drained("decode-0")
        models, prompts = eight_devices
        with cluster.generator(models[0], device_id="late") as gen:
            gen.speculation = None
            result = gen.generate_ids(prompts[0], NEW_TOKENS)
        assert result.token_ids == reference[0]
        assert prefill.stats.forward_batches == 0 and decode.stats.forward_batches > 0
