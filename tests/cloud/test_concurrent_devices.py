"""Many devices against one cloud at once, and the cloud's drain at shutdown.

Eight devices (threads, each with its own model copy, link and generator) with prompts of 5 to 60
tokens generate at the same time, plain and speculative (a random draft adapter, threshold 0 so drafts
are made): prompt chunks of some and decode rounds of others share forwards of the middle part, and
every device's greedy output is exactly its output when it ran alone. Draining refuses new sessions
with OVERLOADED "shutting down" while running sessions go on, and completes once they close.
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import grpc
import pytest
import torch

from cluster import running_cloud
from eight_devices import (FAMILY, K, M, NEW_TOKENS, PROMPT_LENGTHS, SPECULATION, registered_link,
                           run_concurrently)
from hat.cloud.config import CloudConfig
from hat.cloud.server import CloudServer
from hat.common.proto import hat_pb2 as pb
from hat.common.proto import hat_pb2_grpc
from hat.common.split import split_checkpoint
from hat.device.cloud_link import CloudError


# the cloud and eight devices share this machine's cores: one torch thread for all
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(eight_devices, tiny_checkpoint, tmp_path_factory, one_torch_thread):
    """A cloud, and the eight device models and prompts."""
    models, prompts = eight_devices
    with running_cloud(tiny_checkpoint(FAMILY), K, M, tmp_path_factory.mktemp("concurrent") / "cloud") as cluster:
        yield cluster, models, prompts


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_eight_devices_at_once_match_each_run_alone(setup, speculative):
    """Eight devices with prompts of 5..60 tokens generating at once each get exactly the greedy tokens they get
    alone (never batched); together the cloud batched several sessions into one forward; speculation drafted and
    stayed lossless (the plain tokens)."""
    cluster, models, prompts = setup
    stats = cluster.server.stats
    with ExitStack() as stack:
        gens = [stack.enter_context(cluster.generator(model, device_id=f"device-{i}"))
                for i, model in enumerate(models)]
        plain = [gens[0].generate_ids(ids, NEW_TOKENS).token_ids for ids in prompts] if speculative else None
        for gen in gens:
            gen.speculation = SPECULATION if speculative else None
        stats.max_batch_sessions = 0  # the largest batch from here on (a test's view of a running counter)
        alone = [gen.generate_ids(ids, NEW_TOKENS) for gen, ids in zip(gens, prompts)]
        assert stats.max_batch_sessions == 1  # one device at a time: nothing to batch with
        assert all(r.admission_waits == 0 and r.recoveries == 0 for r in alone)
        together = run_concurrently(gens, prompts)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.token_ids == a.token_ids, f"device {i} ({PROMPT_LENGTHS[i]}-token prompt)"
        assert t.finish_reason == a.finish_reason and t.recoveries == 0 and t.speculative == speculative
    assert stats.max_batch_sessions > 1
    if speculative:
        assert sum(s.drafted for r in together for s in r.decode_rounds) > 0
        assert [r.token_ids for r in together] == plain
    assert len(cluster.server.store) == 0 and cluster.server.budget.used_blocks == 0


def test_eight_devices_under_a_small_batch_token_budget(tiny_checkpoint, tmp_path, setup):
    """With max_batch_tokens far below the prompts' chunks (the oldest job always admitted, the rest deferred),
    eight concurrent devices still each get exactly their tokens run alone."""
    _, models, prompts = setup
    with running_cloud(tiny_checkpoint(FAMILY), K, M, tmp_path, max_batch_tokens=12) as cluster:
        with ExitStack() as stack:
            gens = [stack.enter_context(cluster.generator(model, device_id=f"small-{i}"))
                    for i, model in enumerate(models)]
            alone = [gen.generate_ids(ids, NEW_TOKENS).token_ids for gen, ids in zip(gens, prompts)]
            together = run_concurrently(gens, prompts)
        assert [r.token_ids for r in together] == alone
        assert cluster.server.stats.max_batch_sessions > 1


def test_results_report_sessions_sharing_a_forward(setup):
    """RESULT headers of concurrent generations report batch_sessions > 1 for some rounds, never more than the
    devices running, and Stats agrees with the server's own counter."""
    cluster, models, prompts = setup
    seen: list[int] = []
    lock = threading.Lock()
    with ExitStack() as stack:
        gens = [stack.enter_context(cluster.generator(model, device_id=f"observer-{i}"))
                for i, model in enumerate(models)]
        for gen in gens:
            gen.speculation = None
            honest = gen.link.receive

            def receive(*args, _honest=honest, **kwargs):
                reply = _honest(*args, **kwargs)
                if reply.header.kind == pb.RESULT:
                    with lock:
                        seen.append(reply.header.batch_sessions)
                return reply

            gen.link.receive = receive
        run_concurrently(gens, prompts)
        stats = gens[0].link.stats()
    assert seen and max(seen) > 1 and max(seen) <= len(models) and min(seen) >= 1
    assert stats.max_batch_sessions == cluster.server.stats.max_batch_sessions >= max(seen)


# --------------------------------------------------------------------------------------------- drain


def health(ports) -> pb.HealthReply:
    with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
        return hat_pb2_grpc.HatControlStub(channel).Health(pb.HealthRequest(), timeout=10)


def test_drain_refuses_new_sessions_and_waits_for_running_ones(tiny_checkpoint, tmp_path):
    """drain() refuses new OPENs with OVERLOADED "shutting down" (retry 0: a generator does not wait), returns False
    while a session is open (which keeps working), and True once it has closed."""
    with running_cloud(tiny_checkpoint(FAMILY), K, M, tmp_path, profile_on_start=False) as cluster:
        ports = (cluster.data_port, cluster.control_port)
        hidden = torch.randn(3, cluster.server.worker.part.spec.hidden_size)
        with registered_link(ports, cluster.device_dir, "running") as running, \
                registered_link(ports, cluster.device_dir, "newcomer") as newcomer:
            assert running.open_session("kept", 32).header.kind == pb.OPENED
            began = time.monotonic()
            assert cluster.server.drain(0.5) is False
            assert time.monotonic() - began >= 0.45
            assert running.stats().sessions == 1
            assert health(ports).status == "draining"
            with pytest.raises(CloudError) as info:
                newcomer.open_session("late", 32)
            exc = info.value
            assert exc.code == pb.OVERLOADED and "shutting down" in str(exc) and exc.retry_after_s == 0
            # the running session goes on
            assert running.forward("kept", 0, hidden).header.cache_length == 3
            assert running.forward("kept", 3, hidden).header.cache_length == 6
            # a generator is refused at once: no waiting for a cloud that is going away
            with cluster.generator(admission_timeout_s=20.0) as gen:
                began = time.monotonic()
                with pytest.raises(CloudError) as info:
                    gen.generate_ids([5, 6, 7], 4)
                assert info.value.code == pb.OVERLOADED and "shutting down" in str(info.value)
                assert time.monotonic() - began < 2.0
            running.close_session("kept")
            assert cluster.server.drain(2.0) is True
            with pytest.raises(CloudError) as info:  # still draining: no new sessions after a completed drain
                newcomer.open_session("later", 32)
            assert info.value.code == pb.OVERLOADED


def test_stop_with_drain_waits_for_a_session_to_close(tiny_checkpoint, tmp_path):
    """stop(drain_s=...) keeps serving the open session until it closes (from another thread), then stops; it
    does not wait the whole drain time."""
    device_dir, cloud_dir = split_checkpoint(tiny_checkpoint(FAMILY), K, M, tmp_path / "bundle")
    server = CloudServer(CloudConfig(bundle=str(cloud_dir), data_address="tcp://127.0.0.1:0",
                                     control_address="127.0.0.1:0", profile_on_start=False)).start()
    ports = (int(server.data_address.rsplit(":", 1)[1]), int(server.control_address.rsplit(":", 1)[1]))
    closed: list = []
    try:
        link = registered_link(ports, device_dir, "closing-later")
        link.open_session("s", 16)

        def close_later():
            time.sleep(0.5)
            try:
                link.forward("s", 0, torch.randn(2, server.worker.part.spec.hidden_size))  # still served
                closed.append(link.close_session("s").header.kind)
            except BaseException as exc:
                closed.append(exc)

        closer = threading.Thread(target=close_later, daemon=True)
        closer.start()
        began = time.monotonic()
        server.stop(drain_s=10.0)
        took = time.monotonic() - began
        closer.join(10)
        link.close()
    except BaseException:
        server.stop()
        raise
    assert closed == [pb.CLOSED]
    assert 0.4 <= took < 8.0
