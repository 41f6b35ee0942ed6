"""A cloud server on loopback for tests: split a checkpoint, serve its cloud part, hand out device links."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hat.cloud.config import CloudConfig
from hat.cloud.server import CloudServer
from hat.common.split import split_checkpoint
from hat.device.cloud_link import CloudLink, LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.generator import SplitGenerator


@dataclass
class Cluster:
    server: CloudServer
    device_dir: Path
    cloud_dir: Path
    data_port: int
    control_port: int

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
