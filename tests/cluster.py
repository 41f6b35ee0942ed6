"""A cloud server on loopback for tests: split a checkpoint, serve its cloud part, hand out device links."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hat.cloud.config import CloudConfig, RouterConfig
from hat.cloud.router import Router
from hat.cloud.server import CloudServer
from hat.common.split import split_checkpoint
from hat.device.cloud_link import CloudLink, LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.generator import SplitGenerator


@dataclass
class Cluster:
    server: CloudServer | Router  # what devices talk to: the single cloud process, or the router
    device_dir: Path
    cloud_dir: Path
    data_port: int
    control_port: int
    workers: list[CloudServer] = field(default_factory=list)  # a disaggregated cloud's prefill and decode workers

    def link_config(self, **overrides) -> LinkConfig:
        fields = {"host": "127.0.0.1", "data_port": self.data_port, "control_port": self.control_port,
                  "reply_timeout_s": 20.0}
        return LinkConfig(**{**fields, **overrides})

    @contextmanager
    def generator(self, model: DeviceModel | None = None, **link_overrides):
        """A registered SplitGenerator on its own link."""
        model = model or DeviceModel.load(self.device_dir)
        with CloudLink(self.link_config(**link_overrides)) as link:
            link.register(model.manifest)
            yield SplitGenerator(model, link)


@contextmanager
def running_cloud(model_dir: Path, input_layers: int, output_layers: int, work_dir: Path, **config_overrides):
    device_dir, cloud_dir = split_checkpoint(model_dir, input_layers, output_layers, work_dir / "bundle")
    config = CloudConfig(bundle=str(cloud_dir), data_address="tcp://127.0.0.1:0", control_address="127.0.0.1:0",
                         **config_overrides)
    with CloudServer(config) as server:
        yield Cluster(server, device_dir, cloud_dir, int(server.data_address.rsplit(":", 1)[1]),
                      int(server.control_address.rsplit(":", 1)[1]))


def start_worker(router: Router, cloud_dir: Path, role: str, register_timeout_s: float = 20.0,
                 **config_overrides) -> CloudServer:
    """A prefill or decode worker registered with `router` (the caller stops it; stopped here if it cannot register)."""
    config = CloudConfig(bundle=str(cloud_dir), role=role, router_address=router.worker_address,
                         heartbeat_interval_s=0.1, **config_overrides)
    worker = CloudServer(config).start()
    try:
        worker.wait_registered(register_timeout_s)
    except BaseException:
        worker.stop(grace_s=0.1)
        raise
    return worker


@contextmanager
def running_disaggregated(model_dir: Path, input_layers: int, output_layers: int, work_dir: Path, prefill: int = 1,
                          decode: int = 2, router_overrides: dict | None = None, **worker_overrides):
    """A router with `prefill` prefill and `decode` decode workers ("prefill-0", "decode-1", ...), all in this
    process on loopback."""
    device_dir, cloud_dir = split_checkpoint(model_dir, input_layers, output_layers, work_dir / "bundle")
    config = RouterConfig(bundle=str(cloud_dir), data_address="tcp://127.0.0.1:0", control_address="127.0.0.1:0",
                          worker_address="tcp://127.0.0.1:0", **(router_overrides or {}))
    with Router(config) as router, ExitStack() as stack:
        workers = []
        for role, count in (("prefill", prefill), ("decode", decode)):
            for i in range(count):
                worker = start_worker(router, cloud_dir, role, worker_id=f"{role}-{i}", **worker_overrides)
                stack.callback(worker.stop)
                workers.append(worker)
        yield Cluster(router, device_dir, cloud_dir, int(router.data_address.rsplit(":", 1)[1]),
                      int(router.control_address.rsplit(":", 1)[1]), workers)
