"""What `hat export-onnx` wrote into a device bundle (BUNDLE/onnx/onnx_manifest.json), and whether it still fits it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hat.common.bundle import BundleManifest

ONNX_DIR = "onnx"  # the device bundle's folder of exported graphs
ONNX_MANIFEST = "onnx_manifest.json"
ONNX_FORMAT_VERSION = 2  # 2: the past as one input per layer (1: one stacked past_keys/past_values input)
# graph name -> file; the adapter and the output layers are absent when the bundle has no adapter or M = 0
GRAPH_FILES = {"input_part": "input_part.onnx", "adapter": "adapter.onnx", "output_layers": "output_layers.onnx",
               "head": "head.onnx"}
ONNX_DTYPES = ("float32", "float16")  # numpy, and so onnxruntime's Python API, has no bfloat16


def past_names(layers: int) -> tuple[str, ...]:
    """A graph's past inputs in order: past_key_0, past_value_0, past_key_1, ... (one pair per decoder layer)."""
    return tuple(f"past_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value"))


class OnnxBundleError(ValueError):
    """The bundle has no export, or one made for other weights, another split or another adapter."""


@dataclass(frozen=True, slots=True)
class OnnxManifest:
    source_fingerprint: str  # the device bundle's source checkpoint (BundleManifest.source_fingerprint)
    input_layers: int  # K of the bundle's split
    output_layers: int  # M of the bundle's split
    dtype: str  # compute dtype of the graphs: float32 or float16
    opset: int  # ONNX opset the graphs were exported at
    graphs: dict[str, str]  # graph name (GRAPH_FILES' keys) -> file name in the onnx folder
    adapter_sha256: str = ""  # sha256 of the adapter weights exported ("" when the bundle has no adapter)
    max_abs_error: dict[str, float] = field(default_factory=dict)  # graph -> largest |onnx - torch| seen at export
    exporter: str = ""  # torch, onnx and onnxscript versions that wrote the graphs, for messages only
    format_version: int = ONNX_FORMAT_VERSION  # layout of this folder

    def save(self, folder: Path) -> None:
        (Path(folder) / ONNX_MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "OnnxManifest":
        path = Path(folder) / ONNX_MANIFEST
        if not path.is_file():
            raise OnnxBundleError(f"{folder} holds no ONNX export (no {ONNX_MANIFEST}): run "
                                  f"`hat export-onnx --bundle BUNDLE/device` first")
        data = json.loads(path.read_text())
        if data.get("format_version") != ONNX_FORMAT_VERSION:
            raise OnnxBundleError(f"{path}: export format {data.get('format_version')}, this version reads "
                                  f"{ONNX_FORMAT_VERSION}; re-run `hat export-onnx`")
        try:
            return cls(**data)
        except TypeError as exc:
            raise OnnxBundleError(f"{path} is not a valid ONNX manifest: {exc}") from None

    def check_fits(self, bundle: BundleManifest, adapter_sha256: str | None) -> None:
        """Raise OnnxBundleError unless these graphs were exported from this bundle's weights and adapter
        (`adapter_sha256` None: the adapter is left unread, plain decoding asked for, so its graph is not checked)."""
        if (self.source_fingerprint, self.input_layers, self.output_layers) != (
                bundle.source_fingerprint, bundle.input_layers, bundle.output_layers):
            raise OnnxBundleError(f"the ONNX export is of checkpoint {self.source_fingerprint[:12]} split K={self.input_layers}, "
                                  f"M={self.output_layers}; the bundle is {bundle.source_fingerprint[:12]} K={bundle.input_layers}, "
                                  f"M={bundle.output_layers}: re-run `hat export-onnx`")
        if adapter_sha256 is not None and adapter_sha256 != self.adapter_sha256:
            raise OnnxBundleError("the bundle's draft adapter changed since the ONNX export: re-run `hat export-onnx`")


def file_sha256(path: Path | None) -> str:
    """sha256 of a file's bytes, "" for None or a missing file."""
    if path is None or not Path(path).is_file():
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
