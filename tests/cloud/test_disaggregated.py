"""A disaggregated cloud: a router, prefill and decode workers, KV handed off between them.

Oracle: transformers' greedy generate of the whole model. Eight devices at once (plain and
speculative) get exactly its tokens while their sessions prefill on one worker and decode on others;
a decode worker stopped mid-run costs its sessions a re-prefill from the devices' history and nothing
else; sessions moved between decode workers for balance compute exactly what a single cloud does.
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import pytest
import torch

from cluster import running_cloud, running_disaggregated, start_worker
from hat.cloud.config import RouterConfig
from hat.common.proto import hat_pb2 as pb
from hat.device.cloud_link import CloudError
from eight_devices import FAMILY, K, M, SPECULATION, registered_link, run_concurrently, slow_rounds

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_clean(cluster) -> None:
    """Every worker's sessions closed and KV released."""
    deadline = time.monotonic() + 5
    while any(len(w.store) for w in cluster.workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [len(w.store) for w in cluster.workers] == [0] * len(cluster.workers)
    assert [w.budget.used_blocks for w in cluster.workers] == [0] * len(cluster.workers)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_eight_devices_prefill_on_one_worker_and_decode_on_others(eight_devices, reference, tiny_checkpoint, tmp_path,
                                                                  speculative):
    """Policy "always": every session prefills on the prefill worker, its KV goes to a decode worker at its first
    round; eight devices at once get transformers' greedy tokens; both decode workers served sessions."""
    models, prompts = eight_devices
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=2,
                               router_overrides={"disaggregation": "always"}, profile_on_start=False) as cluster:
        with ExitStack() as stack:
            gens = [stack.enter_context(cluster.generator(model, device_id=f"d{i}")) for i, model in enumerate(models)]
            for gen in gens:
                gen.speculation = SPECULATION if speculative else None
            results = run_concurrently(gens, prompts)
        assert [r.token_ids for r in results] == reference
        assert all(r.recoveries == 0 for r in results)
        counters = cluster.server.counters
        # one handoff per session to a decode worker, plus any rebalancing move between the decode workers (when a
        # slow run leaves their session counts apart for a rebalancing interval)
        assert counters.handoffs == len(prompts) + counters.rebalance_moves and counters.handoff_failures == 0
        # every prefilled position moved, and nothing else: KV bytes = positions x the middle part's bytes per position
        part = cluster.workers[0].worker.part
        assert counters.handoff_bytes == counters.handoff_positions * part.kv_bytes_per_position
        assert counters.handoff_positions >= sum(len(p) for p in prompts)
        prefill, *decoders = cluster.workers
        assert prefill.agent.handoffs_out == len(prompts)
        assert all(d.agent.handoffs_in > 0 for d in decoders)
        assert all(d.stats.forward_batches > 0 for d in decoders)
        assert_clean(cluster)


@pytest.mark.parametrize("policy", ["never", "auto"])
def test_sessions_stay_on_the_prefill_worker_while_its_rounds_meet_their_target(eight_devices, reference, tiny_checkpoint,
                                                                                tmp_path, policy):
    """"never", and "auto" with a target the prefill worker easily meets (10 s): no handoff; the decode workers
    idle; outputs exact."""
    models, prompts = eight_devices
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=1,
                               router_overrides={"disaggregation": policy}) as cluster:
        with ExitStack() as stack:
            gens = [stack.enter_context(cluster.generator(model, device_id=f"d{i}", tbt_slo_ms=10_000))
                    for i, model in enumerate(models[:4])]
            results = run_concurrently(gens, prompts[:4])
        assert [r.token_ids for r in results] == reference[:4]
        assert cluster.server.counters.handoffs == 0
        assert cluster.workers[1].stats.forward_batches == 0
        assert_clean(cluster)


def test_a_decode_worker_stopped_mid_run_costs_only_a_re_prefill(eight_devices, reference, tiny_checkpoint, tmp_path):
    """Eight devices decode on two decode workers; one is stopped while its sessions are mid-generation. The router
    answers their requests in flight with UNKNOWN_SESSION; each device re-opens, re-sends its history as prompt
    chunks (re-prefilled on the prefill worker, handed to the surviving decode worker) and ends with exactly
    transformers' tokens."""
    models, prompts = eight_devices
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path, prefill=1, decode=2,
                               router_overrides={"disaggregation": "always"}, profile_on_start=False) as cluster:
        with ExitStack() as stack:
            gens = [stack.enter_context(cluster.generator(model, device_id=f"d{i}")) for i, model in enumerate(models)]
            for gen in gens:  # slow each round a little, so sessions are surely mid-run when the worker goes
                gen.speculation = None
                slow_rounds(gen.link)
            victim = cluster.workers[1]
            killed = threading.Event()

            def kill_when_busy():
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and victim.agent.handoffs_in < 2:
                    time.sleep(0.005)
                victim.stop(grace_s=0.5)
                killed.set()

            killer = threading.Thread(target=kill_when_busy, daemon=True)
            killer.start()
            results = run_concurrently(gens, prompts)
            killer.join(10)
        assert killed.is_set()
        assert [r.token_ids for r in results] == reference
        assert sum(r.recoveries for r in results) >= 1
        assert cluster.server.counters.workers_lost == 1
        survivor = cluster.workers[2]
        assert survivor.agent.handoffs_in > 0
        assert len(survivor.store) == 0 and len(cluster.workers[0].store) == 0


def test_uneven_decode_workers_are_rebalanced_exactly(tiny_checkpoint, tmp_path):
    """Four sessions decode on the only decode worker; a second one joins; the router moves sessions to it until
    their counts differ by less than the margin. Every later round on a moved session returns exactly what a
    single-process cloud returns for the same FORWARDs."""
    model_dir = tiny_checkpoint(FAMILY)
    torch.manual_seed(0)
    sessions = [f"s{i}" for i in range(4)]
    with running_cloud(model_dir, K, M, tmp_path / "single", profile_on_start=False) as single:
        hidden_size = single.server.worker.part.spec.hidden_size
        prompts = {s: torch.randn(9 + 3 * i, hidden_size) for i, s in enumerate(sessions)}
        rounds = [{s: torch.randn(2, hidden_size) for s in sessions} for _ in range(3)]
        want = {}
        with registered_link((single.data_port, single.control_port), single.device_dir, "ref") as link:
            for s in sessions:
                link.open_session(s, 64)
                link.receive(link.send_forward(s, 0, prompts[s], append_only=True))
                want[s] = [link.forward(s, len(prompts[s]) + 2 * r, rounds[r][s]).tensor.clone() for r in range(3)]
    overrides = {"disaggregation": "always", "rebalance_interval_s": 0.1, "move_cooldown_s": 0.0}
    with running_disaggregated(model_dir, K, M, tmp_path / "disagg", prefill=1, decode=1, router_overrides=overrides,
                               profile_on_start=False) as cluster:
        router = cluster.server
        with registered_link((cluster.data_port, cluster.control_port), cluster.device_dir, "dev") as link:
            got = {s: [] for s in sessions}
            for s in sessions:
                link.open_session(s, 64)
                link.receive(link.send_forward(s, 0, prompts[s], append_only=True))
                got[s].append(link.forward(s, len(prompts[s]), rounds[0][s]).tensor.clone())
            first = cluster.workers[1]
            assert len(first.store) == 4
            second = start_worker(router, cluster.cloud_dir, "decode", profile_on_start=False)
            try:
                deadline = time.monotonic() + 10
                # the source drops a moved session once its KV is pushed: wait for both sides, not the target alone
                while time.monotonic() < deadline and (len(first.store), len(second.store)) != (2, 2):
                    time.sleep(0.02)
                assert (len(first.store), len(second.store)) == (2, 2)
                assert router.counters.rebalance_moves == 2
                for r in (1, 2):
                    for s in sessions:
                        got[s].append(link.forward(s, len(prompts[s]) + 2 * r, rounds[r][s]).tensor.clone())
                assert second.stats.forward_batches > 0
            finally:
                second.stop()
    for s in sessions:
        for r in range(3):
            assert torch.equal(got[s][r], want[s][r]), (s, r)


def test_a_full_prefill_worker_refuses_new_sessions_while_running_ones_go_on(tiny_checkpoint, tmp_path):
    """KV memory for one session on the only worker: a second OPEN is refused OVERLOADED with a retry hint (never
    dropped) while the first session keeps working; once it closes, the second is admitted."""
    model_dir = tiny_checkpoint(FAMILY)
    with running_disaggregated(model_dir, K, M, tmp_path, prefill=1, decode=0, profile_on_start=False,
                               kv_budget_bytes=64 * 1536) as cluster:  # 3 layers x 4 kv heads x 16 x (k, v) x 4 B
        worker = cluster.workers[0]
        assert worker.budget.total_blocks * worker.budget.block_tokens == 64
        ports = (cluster.data_port, cluster.control_port)
        hidden = torch.randn(3, worker.worker.part.spec.hidden_size)
        with registered_link(ports, cluster.device_dir, "first") as first, \
                registered_link(ports, cluster.device_dir, "second") as second:
            assert first.open_session("a", 64).header.kind == pb.OPENED
            with pytest.raises(CloudError) as info:
                second.open_session("b", 64)
            assert info.value.code == pb.OVERLOADED and info.value.retry_after_s > 0
            assert first.forward("a", 0, hidden).header.cache_length == 3
            first.close_session("a")
            deadline = time.monotonic() + 5
            while True:
                try:
                    assert second.open_session("b", 64).header.kind == pb.OPENED
                    break
                except CloudError as exc:  # the router learns of the freed room at the worker's next heartbeat
                    assert exc.code == pb.OVERLOADED and time.monotonic() < deadline
                    time.sleep(exc.retry_after_s)
            assert second.forward("b", 0, hidden).header.cache_length == 3


def test_a_worker_serving_another_model_is_refused(tiny_checkpoint, tmp_path):
    with running_disaggregated(tiny_checkpoint(FAMILY), K, M, tmp_path / "a", prefill=1, decode=0) as cluster:
        from hat.common.split import split_checkpoint

        _, other = split_checkpoint(tiny_checkpoint("qwen2"), K, M, tmp_path / "other")
        with pytest.raises(RuntimeError, match="refused this worker.*checkpoint"):
            start_worker(cluster.server, other, "decode", profile_on_start=False)
        assert len(cluster.server.table.workers) == 1


def test_router_config_is_checked():
    with pytest.raises(ValueError, match="disaggregation"):
        RouterConfig(bundle="x", disaggregation="sometimes")
    with pytest.raises(ValueError, match="worker_timeout_s"):
        RouterConfig(bundle="x", worker_timeout_s=0)


def test_ray_pool_config_and_flags_are_checked(tmp_path):
    from hat.cli.main import main
    from hat.cloud.ray_config import MAX_POOL_WORKERS, RayPoolConfig, WorkerSettings

    settings = WorkerSettings(bundle="x")
    with pytest.raises(ValueError, match="token file"):  # joining a cluster needs its token, or a word that it has none
        RayPoolConfig(address="10.0.0.2:6379", worker=settings)
    assert RayPoolConfig(address="10.0.0.2:6379", worker=settings, auth_disabled=True).auth_disabled
    with pytest.raises(ValueError, match="decode_workers"):
        RayPoolConfig(address="local", worker=settings, decode_workers=-1)
    with pytest.raises(ValueError, match=f"at most {MAX_POOL_WORKERS}"):
        RayPoolConfig(address="local", worker=settings, prefill_workers=MAX_POOL_WORKERS + 1)
    with pytest.raises(ValueError, match="threads"):
        RayPoolConfig(address="local", worker=WorkerSettings(bundle="x", threads=0))
    with pytest.raises(SystemExit, match="--ray-address is the router's"):
        main(["cloud", "serve", "--role", "decode", "--bundle", str(tmp_path), "--router", "tcp://127.0.0.1:1",
              "--ray-address", "local"])
    with pytest.raises(SystemExit, match="must not be negative"):
        main(["cloud", "scale", "--control", "127.0.0.1:1", "--decode-workers", "-1"])
