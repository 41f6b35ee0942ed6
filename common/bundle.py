"""Bundle manifests: what a device or cloud bundle holds, and whether two bundles belong together."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class BundleMismatchError(ValueError):
    """A device and a cloud bundle that were not cut from the same checkpoint with the same split."""


@dataclass(frozen=True, slots=True)
class BundleManifest:
    part: str  # "device" or "cloud"
    model_type: str  # transformers model_type of the source checkpoint
    num_layers: int  # decoder layers of the whole model
    input_layers: int  # K: layers [0, K) run on the device before the cloud
    output_layers: int  # M: layers [N-M, N) run on the device after the cloud
    hidden_size: int  # width of the hidden states that cross the network
    dtype: str  # storage and compute dtype of this bundle's weights (float32, float16, bfloat16)
    source_fingerprint: str  # sha256 of the source checkpoint (config.json + weight files)
    source_name: str  # folder name of the source checkpoint, for messages only
    format_version: int = FORMAT_VERSION  # bundle layout version

    @property
    def middle_layers(self) -> tuple[int, int]:
        """The cloud's layer range [first, last)."""
        return self.input_layers, self.num_layers - self.output_layers

    def save(self, bundle_dir: Path) -> None:
        (Path(bundle_dir) / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_manifest(bundle_dir: str | Path, part: str | None = None) -> BundleManifest:
    """Read a bundle's manifest; with `part`, also check it is that kind of bundle."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle: no {MANIFEST} (make one with `hat split`)")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: bundle format {data.get('format_version')}, this version reads {FORMAT_VERSION}; re-run `hat split`")
    manifest = BundleManifest(**data)
    if part is not None and manifest.part != part:
        raise ValueError(f"{bundle_dir} is a {manifest.part} bundle, expected a {part} bundle")
    return manifest


def check_compatible(*, fingerprint: str, num_layers: int, input_layers: int, output_layers: int,
                     cloud: BundleManifest) -> None:
    """Raise BundleMismatchError unless a device with these facts belongs with `cloud`."""
    if fingerprint != cloud.source_fingerprint:
        raise BundleMismatchError(
            f"device bundle was cut from checkpoint {fingerprint[:12]}, the cloud serves {cloud.source_fingerprint[:12]} "
            f"({cloud.source_name}): split both from the same checkpoint")
    device_split = (num_layers, input_layers, output_layers)
    cloud_split = (cloud.num_layers, cloud.input_layers, cloud.output_layers)
    if device_split != cloud_split:
        raise BundleMismatchError(
            f"device split (layers, K, M) = {device_split} differs from the cloud's {cloud_split}: "
            "re-run `hat split` with the same --input-layers and --output-layers for both")
