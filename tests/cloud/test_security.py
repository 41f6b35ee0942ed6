"""Encrypted, authenticated links: CURVE on the data plane, TLS with client certificates on gRPC, one allow-list.

An allowed device generates exactly what it generates on a plain link; a device whose key is not allowed is
refused on both planes (and logged); a revoked device is refused from its next message, mid-generation; a device
cannot speak for another device's id; a cloud or device on an address other machines can reach refuses to run
without keys unless told --insecure.
"""
from __future__ import annotations

import logging
import time

import grpc
import pytest
import zmq

from cluster import running_cloud, running_disaggregated, start_worker
from hat.cli.main import main
from hat.common import wire
from hat.common.keys import SecurityConfigError, is_loopback, load_public
from hat.common.proto import hat_pb2 as pb
from hat.cloud import allow_list
from hat.cloud.config import CloudConfig
from hat.cloud.server import CloudServer
from hat.device.cloud_link import CloudError, CloudLink, LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.generator import SplitGenerator

PROMPT = "import os, sys\nfor x in range(10):"


@pytest.fixture
def keys(tmp_path):
    """A cloud key folder allowing device `orin-01`, that device's folder, and an `intruder` never allowed; both
    devices trust the cloud's key."""
    folders = {name: tmp_path / name for name in ("cloud", "orin-01", "intruder")}
    for name, folder in folders.items():
        assert main(["keys", "generate", "--out", str(folder), "--name", name]) == 0
    assert main(["keys", "add", "--keys", str(folders["cloud"]), str(folders["orin-01"] / "orin-01.key")]) == 0
    for device in ("orin-01", "intruder"):
        assert main(["keys", "add", "--keys", str(folders[device]), "--server", str(folders["cloud"] / "cloud.key")]) == 0
    return {name: str(folder) for name, folder in folders.items()}


def _generate(cluster, model, **link) -> list[int]:
    with CloudLink(cluster.link_config(**link)) as connection:
        connection.register(model.manifest)
        generator = SplitGenerator(model, connection)
        return generator.generate_ids(generator.encode(PROMPT), 12).token_ids


def test_allowed_device_gets_the_same_tokens_encrypted(tiny_checkpoint, tmp_path, keys):
    model_dir = tiny_checkpoint("llama_tied_bias")
    with running_cloud(model_dir, 2, 1, tmp_path / "plain") as cluster:
        model = DeviceModel.load(cluster.device_dir)
        plain = _generate(cluster, model)
    with running_cloud(model_dir, 2, 1, tmp_path / "keyed", keys_dir=keys["cloud"]) as cluster:
        assert _generate(cluster, model, keys_dir=keys["orin-01"]) == plain
        assert list(cluster.server.registry._devices) == ["orin-01"]  # the key's name is the device id


def test_unknown_keys_and_plain_sockets_are_refused(tiny_checkpoint, tmp_path, keys, caplog):
    model_dir = tiny_checkpoint("llama_tied_bias")
    with running_cloud(model_dir, 2, 1, tmp_path, keys_dir=keys["cloud"]) as cluster:
        model = DeviceModel.load(cluster.device_dir)
        with pytest.raises(CloudError, match="allow-list"):
            _generate(cluster, model, keys_dir=keys["intruder"], control_timeout_s=1.5)
        with pytest.raises(CloudError, match="DEADLINE_EXCEEDED|UNAVAILABLE"):  # no TLS at all
            _generate(cluster, model, control_timeout_s=1.5)
        # the data plane on its own: an unknown CURVE key, and a plain socket, get no reply to an OPEN
        intruder = load_public(f"{keys['intruder']}/intruder.key")
        secret = open(f"{keys['intruder']}/intruder.key_secret").read().split('secret-key = "')[1][:40].encode()
        cloud = load_public(f"{keys['cloud']}/cloud.key")
        context = zmq.Context()
        try:
            for curve in (True, False):
                socket = context.socket(zmq.DEALER)
                socket.setsockopt(zmq.LINGER, 0)
                if curve:
                    socket.curve_serverkey, socket.curve_publickey = cloud.curve_public, intruder.curve_public
                    socket.curve_secretkey = secret
                socket.connect(f"tcp://127.0.0.1:{cluster.data_port}")
                socket.send_multipart(wire.encode(wire.make_header(pb.OPEN, "s", 1, device_id="orin-01")), copy=False)
                assert not socket.poll(1000), "an unauthenticated socket got a reply"
                socket.close()
        finally:
            context.term()
        # the allowed device still works beside them
        assert len(_generate(cluster, model, keys_dir=keys["orin-01"])) == 12
    assert any("refused a data-plane connection" in r.getMessage() for r in caplog.records)


def test_revocation_applies_to_the_next_message(tiny_checkpoint, tmp_path, keys, monkeypatch):
    monkeypatch.setattr(allow_list, "RECHECK_S", 0.0)
    model_dir = tiny_checkpoint("llama_tied_bias")
    with running_cloud(model_dir, 2, 1, tmp_path, keys_dir=keys["cloud"]) as cluster:
        model = DeviceModel.load(cluster.device_dir)
        with CloudLink(cluster.link_config(keys_dir=keys["orin-01"])) as connection:
            connection.register(model.manifest)
            generator = SplitGenerator(model, connection)
            assert len(generator.generate_ids(generator.encode(PROMPT), 4).token_ids) == 4
            assert main(["keys", "revoke", "--keys", keys["cloud"], "orin-01"]) == 0
            time.sleep(0.05)
            with pytest.raises(CloudError, match="allow-list") as refused:
                generator.generate_ids(generator.encode(PROMPT), 4)  # same connection, next OPEN
            assert refused.value.code == pb.UNAUTHORIZED
            with pytest.raises(grpc.RpcError) as denied:  # the control plane's open TLS connection: next RPC
                connection.stats()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(CloudError, match="allow-list"):  # a new connection: refused at the TLS handshake
            _generate(cluster, model, keys_dir=keys["orin-01"], control_timeout_s=1.5)


def test_a_device_cannot_speak_for_another(tiny_checkpoint, tmp_path, keys):
    model_dir = tiny_checkpoint("llama_tied_bias")
    with running_cloud(model_dir, 2, 1, tmp_path, keys_dir=keys["cloud"]) as cluster:
        model = DeviceModel.load(cluster.device_dir)
        with pytest.raises(CloudError, match="not the id of this device's key"):
            _generate(cluster, model, keys_dir=keys["orin-01"], device_id="orin-02")


def test_router_and_workers_with_keys(tiny_checkpoint, tmp_path, keys):
    """Router, prefill and decode workers share the cloud's keys: devices are admitted as by a single process, the
    worker links and the KV handoff between workers run over CURVE, and a worker without the keys cannot join."""
    model_dir = tiny_checkpoint("llama_tied_bias")
    with running_cloud(model_dir, 2, 1, tmp_path / "plain") as cluster:
        plain = _generate(cluster, DeviceModel.load(cluster.device_dir))
    with running_disaggregated(model_dir, 2, 1, tmp_path / "keyed", prefill=1, decode=1, keys_dir=keys["cloud"],
                               router_overrides={"keys_dir": keys["cloud"], "disaggregation": "always"}) as cluster:
        model = DeviceModel.load(cluster.device_dir)
        assert _generate(cluster, model, keys_dir=keys["orin-01"]) == plain
        assert cluster.server.counters.handoffs >= 1  # the session's KV went from the prefill to the decode worker
        with pytest.raises(CloudError, match="allow-list"):
            _generate(cluster, model, keys_dir=keys["intruder"], control_timeout_s=1.5)
        with pytest.raises(RuntimeError, match="no answer from the router"):
            start_worker(cluster.server, cluster.cloud_dir, "decode", register_timeout_s=2.0)


def test_exposed_addresses_need_keys_or_insecure(tiny_checkpoint, tmp_path, caplog):
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("localhost:1") and is_loopback("[::1]:5556")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555") and not is_loopback("10.0.0.5:1")
    from hat.common.split import split_checkpoint

    _, cloud_dir = split_checkpoint(tiny_checkpoint("llama_tied_bias"), 2, 1, tmp_path / "bundle")
    exposed = dict(bundle=str(cloud_dir), data_address="tcp://0.0.0.0:0", control_address="127.0.0.1:0",
                   profile_on_start=False)
    with pytest.raises(SecurityConfigError, match="--keys"):
        CloudServer(CloudConfig(**exposed)).start()
    with caplog.at_level(logging.WARNING), CloudServer(CloudConfig(**exposed, insecure=True)) as server:
        assert server.security is None
    assert any("WITHOUT encryption" in r.getMessage() for r in caplog.records)
    with pytest.raises(SecurityConfigError, match="--insecure"):
        CloudLink(LinkConfig(host="10.1.2.3"))
    assert main(["generate", "--bundle", str(tmp_path / "bundle" / "device"), "--cloud", "10.1.2.3",
                 "--prompt", "x"]) == 2


def test_only_the_cloud_s_own_key_may_scale(tiny_checkpoint, tmp_path, keys):
    """Scale is an operator's call: made with the cloud's own key folder it passes the TLS check (and this router,
    keeping no Ray pool, says so); an allowed device is refused, and so is a device whose key bears the cloud's
    name, since the whole certificate must be the cloud's. Device RPCs are unchanged for the allowed device."""
    from hat.common.keys import load_identity, load_server
    from hat.common.proto import hat_pb2_grpc
    from hat.device.cloud_link import control_channel

    namesake = tmp_path / "namesake"
    assert main(["keys", "generate", "--out", str(namesake), "--name", "cloud"]) == 0
    assert main(["keys", "add", "--keys", str(namesake), "--server", str(tmp_path / "cloud" / "cloud.key")]) == 0
    with running_disaggregated(tiny_checkpoint("llama_tied_bias"), 2, 1, tmp_path / "keyed", prefill=1, decode=0,
                               keys_dir=keys["cloud"], router_overrides={"keys_dir": keys["cloud"]}) as cluster:
        control = f"127.0.0.1:{cluster.control_port}"
        with pytest.raises(SystemExit, match="keeps no pool of workers"):
            main(["cloud", "scale", "--control", control, "--keys", keys["cloud"], "--decode-workers", "1"])
        assert main(["keys", "add", "--keys", keys["cloud"], str(namesake / "cloud.key")]) == 0
        time.sleep(allow_list.RECHECK_S + 0.2)  # the running cloud reads its allow-list again
        for folder in (keys["orin-01"], str(namesake)):
            with control_channel(control, (load_identity(folder), load_server(folder))) as channel:
                stub = hat_pb2_grpc.HatControlStub(channel)
                assert stub.Health(pb.HealthRequest(), timeout=5).status == "serving"
                with pytest.raises(grpc.RpcError) as info:
                    stub.Scale(pb.ScaleRequest(decode_workers=1), timeout=5)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, folder
