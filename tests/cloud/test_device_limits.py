"""Hostile input against a single cloud process: per-connection message rate, per-device sessions, the largest
frame accepted, and thousands of fuzzed messages while an honest device generates (whose output must not change).
"""
from __future__ import annotations

import threading

import pytest
import torch
import zmq
from hypothesis import HealthCheck, event, given, settings

from checkpoints import TOKENIZER_TEXT
from cluster import running_cloud
from hat.cloud.device_limits import DeviceLimits, DeviceLimitsConfig
from hat.common import wire
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError
from hat.device.cloud_link import CloudError
from hat.device.device_model import DeviceModel
from test_cluster_fuzz import RawPeer, device_messages
from test_generate_oracle import hf_greedy

FAMILY, K, M = "qwen2", 1, 2
NEW_TOKENS = 16
SERVER_FUZZ = settings(max_examples=1500, deadline=None, database=None, derandomize=True,
                       suppress_health_check=list(HealthCheck))


def test_token_bucket_refuses_beyond_the_burst_and_refills():
    now = [0.0]
    limits = DeviceLimits(DeviceLimitsConfig(messages_per_s=10, burst=3, sessions_per_device=2), 250, lambda: now[0])
    for _ in range(3):
        limits.check_rate(b"a")
    with pytest.raises(WireError, match="messages/s") as refused:
        limits.check_rate(b"a")
    assert refused.value.code == pb.OVERLOADED and refused.value.retry_after_ms == 100
    limits.check_rate(b"b")  # another connection has its own bucket
    now[0] = 0.1  # one message's worth of refill
    limits.check_rate(b"a")
    with pytest.raises(WireError):
        limits.check_rate(b"a")
    limits.check_sessions("d", 1)
    with pytest.raises(WireError, match="limit of 2 open sessions"):
        limits.check_sessions("d", 2)
    assert limits.refusals == 3


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    model_dir = tiny_checkpoint(FAMILY)
    limits = DeviceLimitsConfig(messages_per_s=200, burst=100, sessions_per_device=2)
    with running_cloud(model_dir, K, M, tmp_path_factory.mktemp("limits"), device_limits=limits,
                       max_tokens_per_message=64, profile_on_start=False) as cluster:
        prompt = DeviceModel.load(cluster.device_dir).tokenizer(TOKENIZER_TEXT)["input_ids"][3:30]
        cluster.prompt, cluster.reference = prompt, hf_greedy(model_dir, prompt, NEW_TOKENS)
        yield cluster


def honest_generation(cluster, device_id: str) -> list[int]:
    with cluster.generator(device_id=device_id) as gen:
        return gen.generate_ids(cluster.prompt, NEW_TOKENS).token_ids


def test_a_flooding_connection_is_slowed_and_others_are_not(served):
    peer = RawPeer(zmq.DEALER, f"tcp://127.0.0.1:{served.data_port}")
    try:
        flood = wire.encode(wire.make_header(pb.CLOSE, "no-such-session", 1))
        for _ in range(400):
            peer.send(flood)
        codes = []
        while (reply := peer.recv(2.0)) is not None and len(codes) < 400:
            codes.append(wire.decode(reply).header.error_code)
        assert len(codes) == 400  # every message answered, none dropped
        assert codes.count(pb.OVERLOADED) >= 100 and pb.UNKNOWN_SESSION in codes
        assert honest_generation(served, "honest-beside-flood") == served.reference
    finally:
        peer.close()


def test_a_device_holds_at_most_its_sessions(served):
    with served.generator(device_id="greedy-device") as gen:
        link = gen.link
        assert link.open_session("s1").header.kind == pb.OPENED
        assert link.open_session("s2").header.kind == pb.OPENED
        assert link.open_session("s2").header.kind == pb.OPENED  # re-opening one's own session is no new session
        with pytest.raises(CloudError, match="limit of 2 open sessions") as refused:
            link.open_session("s3")
        assert refused.value.code == pb.OVERLOADED
        link.close_session("s1")
        assert link.open_session("s3").header.kind == pb.OPENED
        link.close_session("s2")
        link.close_session("s3")


def test_an_oversized_frame_drops_its_sender_only(served):
    peer = RawPeer(zmq.DEALER, f"tcp://127.0.0.1:{served.data_port}")
    try:
        hidden = served.server.worker.part.spec.hidden_size
        huge = torch.zeros(4096, hidden)  # far above max_tokens_per_message=64 and the socket's frame limit
        peer.send(wire.encode(wire.make_header(pb.FORWARD, "big", 1, start=0), huge))
        assert peer.recv(1.0) is None  # libzmq disconnected it before the frame was buffered whole
    finally:
        peer.close()
    assert honest_generation(served, "honest-after-oversized") == served.reference


def test_thousands_of_fuzzed_messages_change_no_one_elses_output(served):
    """1500 random frames, forged headers and mutated requests from a raw connection, while an honest device
    generates on its own: each gets one ERROR with a code; the honest tokens are transformers' greedy ones."""
    results, failures = [], []

    def honest():
        try:
            for i in range(3):
                results.append(honest_generation(served, f"honest-fuzz-{i}"))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    thread = threading.Thread(target=honest)
    peer = RawPeer(zmq.DEALER, f"tcp://127.0.0.1:{served.data_port}")
    answered = []
    try:
        thread.start()

        @SERVER_FUZZ
        @given(device_messages())
        def send_garbage(frames):
            peer.send(frames)
            reply = peer.recv(10.0)
            assert reply is not None, f"no reply to {frames!r}"
            header = wire.decode(reply).header
            assert header.kind == pb.ERROR and header.error_code != pb.ERROR_UNSPECIFIED and header.error_message
            event(pb.ErrorCode.Name(header.error_code))
            assert peer.recv(0) is None
            answered.append(header.error_code)

        send_garbage()
    finally:
        peer.close()
        thread.join(120)
    assert not failures, failures
    assert len(answered) == 1500
    assert results == [served.reference] * 3
    assert served.server._thread.is_alive()
