"""A worker restarted under the same --worker-id, as any supervisor (systemd, Ray, Kubernetes) restarts one.

Oracle: transformers' greedy tokens, and the router's own tables. The router's worker timeout is set far
beyond each test's length, so it never learns of the death from silence: the new process must be admitted
on its registration alone (before the fix it was taken for the dead one's heartbeat and never accepted),
and the dead process's sessions must be handled as a lost worker's (re-sent by their devices, exactly).
A process still alive under an id a newer one took is refused and drops what it held.
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import pytest
import torch

from cluster import running_disaggregated, start_worker
from hat.common.proto import hat_pb2 as pb
from hat.device.cloud_link import CloudError
from eight_devices import FAMILY, K, M, registered_link, run_concurrently, slow_rounds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEVER_S = 600.0  # a worker timeout no test lasts: the router cannot notice a death by silence
REGISTER_S = 10.0  # a tiny bundle loads and registers well within this


def test_a_worker_restarted_under_its_id_is_admitted_and_its_old_sessions_re_sent(tiny_checkpoint, tmp_path):
    """A session decodes on worker "decode-a"; the process stops (the router is not told) and a new one starts
    under the same id: it is accepted at once, the session's next round is answered UNKNOWN_SESSION (its KV died
    with the old process), and a re-opened session is served by the new process."""
    overrides = {"disaggregation": "always", "worker_timeout_s": NEVER_S}
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=0,
                               router_overrides=overrides, profile_on_start=False) as cluster:
        router = cluster.server
        old = start_worker(router, cluster.cloud_dir, "decode", worker_id="decode-a", profile_on_start=False)
        hidden_size = old.worker.part.spec.hidden_size
        prompt, step = torch.randn(9, hidden_size), torch.randn(1, hidden_size)
        with registered_link((cluster.data_port, cluster.control_port), cluster.device_dir, "dev") as link:
            link.open_session("s", 64)
            link.receive(link.send_forward("s", 0, prompt, append_only=True))
            link.forward("s", 9, step)  # the first round moves the session to decode-a
            assert len(old.store) == 1 and router.counters.handoffs == 1
            old.stop(grace_s=0.1)
            began = time.monotonic()
            new = start_worker(router, cluster.cloud_dir, "decode", register_timeout_s=REGISTER_S,
                               worker_id="decode-a", profile_on_start=False)
            try:
                assert time.monotonic() - began < REGISTER_S
                assert router.counters.workers_lost == 1
                [worker] = router.table.of_role("decode")
                assert worker.identity == new.agent.routing_id != old.agent.routing_id
                assert worker.name == "decode-a" and not worker.sessions
                with pytest.raises(CloudError) as info:
                    link.forward("s", 10, step)
                assert info.value.code == pb.UNKNOWN_SESSION
                link.open_session("s2", 64)  # a new session decodes on the new process
                link.receive(link.send_forward("s2", 0, prompt, append_only=True))
                assert link.forward("s2", 9, step).header.cache_length == 10
                assert len(new.store) == 1
            finally:
                new.stop()


def test_devices_mid_run_get_exact_tokens_across_a_restart_under_the_same_id(eight_devices, reference,
                                                                             tiny_checkpoint, tmp_path):
    """Four devices decode on "decode-0" and "decode-1"; "decode-1" stops mid-run and a new process replaces it
    under the same id at once. Its sessions are re-sent (recoveries), every device ends with transformers'
    greedy tokens, and the pool is whole again."""
    models, prompts = eight_devices
    overrides = {"disaggregation": "always", "worker_timeout_s": NEVER_S}
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=2,
                               router_overrides=overrides, profile_on_start=False) as cluster, ExitStack() as stack:
        router = cluster.server
        victim = cluster.workers[2]
        replacement = []
        gens = [stack.enter_context(cluster.generator(model, device_id=f"d{i}")) for i, model in enumerate(models[:4])]
        for gen in gens:  # slow each round a little, so sessions are surely mid-run at the restart
            gen.speculation = None
            slow_rounds(gen.link)

        def restart_when_busy():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(victim.store) < 1:
                time.sleep(0.005)
            victim.stop(grace_s=0.5)
            replacement.append(start_worker(router, cluster.cloud_dir, "decode", register_timeout_s=REGISTER_S,
                                            worker_id="decode-1", profile_on_start=False))

        stack.callback(lambda: [worker.stop() for worker in replacement])
        restarter = threading.Thread(target=restart_when_busy, daemon=True)
        restarter.start()
        results = run_concurrently(gens, prompts[:4])
        restarter.join(REGISTER_S + 5)
        assert replacement, "the replacement did not register"
        assert [r.token_ids for r in results] == reference[:4]
        assert sum(r.recoveries for r in results) >= 1
        assert router.counters.workers_lost == 1
        assert sorted(w.name for w in router.table.of_role("decode")) == ["decode-0", "decode-1"]
        assert router.table.by_name("decode-1").identity == replacement[0].agent.routing_id


def test_a_live_process_under_an_id_a_newer_one_took_is_refused(tiny_checkpoint, tmp_path):
    """Two live processes under one worker id (a supervisor restarted one it wrongly took for dead): the newer
    serves; the older is refused at its next heartbeat, says why, and drops the sessions it held."""
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=0,
                               router_overrides={"worker_timeout_s": NEVER_S}, profile_on_start=False) as cluster:
        router = cluster.server
        older = start_worker(router, cluster.cloud_dir, "decode", worker_id="twin", profile_on_start=False)
        try:
            newer = start_worker(router, cluster.cloud_dir, "decode", worker_id="twin", profile_on_start=False)
            try:
                deadline = time.monotonic() + REGISTER_S
                while older.agent.accepted is not False and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert older.agent.accepted is False and "newer process" in older.agent.refusal
                assert newer.agent.accepted is True
                time.sleep(0.3)  # a few more of the older one's heartbeats: still refused, never registered
                [twin] = router.table.of_role("decode")
                assert twin.identity == newer.agent.routing_id
                assert router.counters.workers_lost == 1
            finally:
                newer.stop()
        finally:
            older.stop()
