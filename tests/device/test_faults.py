"""Faults lose nothing: a cloud restarted mid-generation (the device registers again and re-sends its own token
history: the output is the uninterrupted run's, token for token), a cloud that never comes back (a clear error after
the recovery bound), and a device that vanishes mid-generation (its session and KV memory freed after the idle
timeout)."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from cluster import running_cloud
from hat.cloud.config import CloudConfig
from hat.cloud.server import CloudServer
from hat.common.split import split_checkpoint
from hat.device.cloud_link import CloudError, CloudLink, CloudTimeoutError, LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.generator import SplitGenerator
from hat.device.speculation import SpeculationConfig
from test_speculative import random_adapter

PROMPT = "import os, sys\nfor x in range(10):\n    print(x)"
NEW_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartingCloud:
    """A cloud server on fixed ports that can be killed and started again on the same ports."""

    def __init__(self, cloud_dir):
        self.data_port, self.control_port = free_port(), free_port()
        self.config = CloudConfig(bundle=str(cloud_dir), data_address=f"tcp://127.0.0.1:{self.data_port}",
                                  control_address=f"127.0.0.1:{self.control_port}", profile_on_start=False)
        self.server = CloudServer(self.config).start()
        self.restarted = threading.Event()

    def crash_and_restart(self, down_s: float) -> None:
        """Stop now (sessions, registrations and caches gone); a fresh server on the same ports after `down_s`."""
        self.server.stop(grace_s=0.1)

        def come_back():
            time.sleep(down_s)
            self.server = CloudServer(self.config).start()
            self.restarted.set()

        threading.Thread(target=come_back, daemon=True).start()

    def link_config(self, **overrides) -> LinkConfig:
        return LinkConfig(host="127.0.0.1", data_port=self.data_port, control_port=self.control_port, **overrides)

    def stop(self) -> None:
        self.server.stop(grace_s=0.1)


def crash_before_forward(link: CloudLink, forward_number: int, crash) -> None:
    """Call `crash()` just before the link's `forward_number`-th FORWARD goes out."""
    original, calls = link.send_forward, {"n": 0}

    def send_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == forward_number:
            crash()
        return original(*args, **kwargs)

    link.send_forward = send_forward


@pytest.fixture
def split(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama_tied_bias")
    adapter = random_adapter(model_dir, 2, 1, tmp_path / "adapter")
    device_dir, cloud_dir = split_checkpoint(model_dir, 2, 1, tmp_path / "bundle", adapter=adapter)
    return DeviceModel.load(device_dir), cloud_dir


@pytest.mark.parametrize("speculative", [False, True])
def test_cloud_restart_mid_generation_resumes_identically(split, speculative):
    model, cloud_dir = split
    speculation = SpeculationConfig(threshold=0.0, max_draft=3, length="threshold") if speculative else None
    cloud = RestartingCloud(cloud_dir)
    try:
        link_options = dict(reply_timeout_s=2.0, control_timeout_s=2.0, recovery_timeout_s=30.0)
        with CloudLink(cloud.link_config(**link_options)) as link:
            link.register(model.manifest)
            generator = SplitGenerator(model, link, speculation)
            ids = generator.encode(PROMPT)
            clean = generator.generate_ids(ids, NEW_TOKENS)
            crash_before_forward(link, 6, lambda: cloud.crash_and_restart(down_s=1.0))
            survived = generator.generate_ids(ids, NEW_TOKENS)
        assert cloud.restarted.is_set()
        assert survived.token_ids == clean.token_ids
        assert survived.recoveries >= 1
    finally:
        cloud.restarted.wait(10)
        cloud.stop()


def test_a_cloud_that_stays_down_gives_a_clear_error_after_the_bound(split):
    model, cloud_dir = split
    cloud = RestartingCloud(cloud_dir)
    with CloudLink(cloud.link_config(reply_timeout_s=1.0, control_timeout_s=0.5, recovery_timeout_s=3.0)) as link:
        link.register(model.manifest)
        generator = SplitGenerator(model, link)
        crash_before_forward(link, 4, lambda: cloud.server.stop(grace_s=0.1))
        began = time.monotonic()
        with pytest.raises(CloudError, match="has not answered for 3 s"):
            generator.generate_ids(generator.encode(PROMPT), NEW_TOKENS)
        assert time.monotonic() - began < 15


def test_a_vanished_device_has_its_session_freed(tiny_checkpoint, tmp_path):
    with running_cloud(tiny_checkpoint("llama_tied_bias"), 2, 1, tmp_path, session_idle_timeout_s=0.5) as cluster:
        model = DeviceModel.load(cluster.device_dir)
        link = CloudLink(cluster.link_config())
        link.register(model.manifest)
        generator = SplitGenerator(model, link)
        generator._close_quietly = lambda session_id: None  # a crash sends no CLOSE
        crash_before_forward(link, 5, lambda: (_ for _ in ()).throw(KeyboardInterrupt()))  # the device dies here
        with pytest.raises(KeyboardInterrupt):
            generator.generate_ids(generator.encode(PROMPT), NEW_TOKENS)
        store = cluster.server.store
        assert len(store) == 1 and store.budget.used_blocks > 0
        link._socket.close(linger=0)  # and its connection is gone
        deadline = time.monotonic() + 5
        while (len(store) or store.budget.used_blocks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(store) == 0 and store.budget.used_blocks == 0


@pytest.mark.parametrize("fault", [CloudTimeoutError("no reply"), TypeError("a bug in the device's own code")])
def test_a_close_that_fails_is_quiet_only_when_the_cloud_is_at_fault(tiny_checkpoint, tmp_path, fault):
    """A CLOSE the cloud does not answer leaves the generation's result (its idle expiry frees the session); an error
    of the device's own code while closing is raised, not swallowed (a scratch wrapper of the link that raised a
    TypeError there made every later prefill 1.6x slower, without a word)."""
    with running_cloud(tiny_checkpoint("llama_tied_bias"), 2, 1, tmp_path) as cluster:
        with cluster.generator() as generator:
            def close_session(session_id, timeout_s=5.0):
                raise fault

            generator.link.close_session = close_session
            ids = generator.encode(PROMPT)
            if isinstance(fault, CloudError):
                assert len(generator.generate_ids(ids, 2).token_ids) == 2
            else:
                with pytest.raises(TypeError, match="own code"):
                    generator.generate_ids(ids, 2)
