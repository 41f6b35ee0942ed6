"""`hat export-onnx`: the device bundle's input part, adapter, output layers and head as ONNX graphs (BUNDLE/onnx).

Each graph is traced by torch's dynamo exporter on a batch of 2 (a batch-1 example lets it fix the batch at 1),
with batch, sequence and past lengths declared dynamic; the export then checks that onnxruntime sees those axes
as free and runs each graph on other shapes (one row with no past, three rows with a long past) against the torch
module it came from.
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hat.common.adapter import ADAPTER_WEIGHTS, adapter_spec
from hat.common.checkpoint import parse_dtype

from .device_model import ADAPTER_DIR, DeviceModel
from .onnx_graphs import HeadGraph, InputPartGraph, OutputLayersGraph, adapter_graph
from .onnx_manifest import GRAPH_FILES, ONNX_DIR, ONNX_DTYPES, OnnxManifest, file_sha256, past_names

DEFAULT_OPSET = 18  # standard ops only (no fused attention): what JetPack's onnxruntime and TensorRT take
EXPORT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2}  # largest |onnx - torch| the export accepts, per dtype


class OnnxExportError(RuntimeError):
    """An exported graph lost a dynamic axis or computes something other than its torch module."""


@dataclass(frozen=True, slots=True)
class GraphSpec:
    """One graph to export: its module, input and output names, and how to make an example input."""
    name: str  # GRAPH_FILES key
    module: torch.nn.Module  # export wrapper from onnx_graphs
    inputs: tuple[str, ...]  # input names, in forward's order
    outputs: tuple[str, ...]  # output names, in forward's order
    layers: int  # decoder layers (0 for the head): the leading axis of past and new keys/values
    kv_heads: int  # key/value heads of those layers
    head_dim: int  # width of one head


def _graph_specs(model: DeviceModel) -> list[GraphSpec]:
    spec, new = model.spec, ("new_keys", "new_values")
    k, m = model.input_part.num_layers, model.output_part.num_layers
    graphs = [GraphSpec("input_part", InputPartGraph(model.input_part), ("input_ids", *past_names(k)),
                        ("hidden", "embeds", *new), k, spec.num_kv_heads, spec.head_dim)]
    if model.adapter is not None:
        a = adapter_spec(spec, model.adapter.config)
        named = ("hidden", "embeds", "previous") if model.adapter.conditioned else ("hidden", "embeds")
        graphs.append(GraphSpec("adapter", adapter_graph(model.adapter), (*named, *past_names(a.num_layers)),
                                ("estimate", *new), a.num_layers, a.num_kv_heads, a.head_dim))
    if m:
        graphs.append(GraphSpec("output_layers", OutputLayersGraph(model.output_part), ("hidden", *past_names(m)),
                                ("hidden_out", *new), m, spec.num_kv_heads, spec.head_dim))
    graphs.append(GraphSpec("head", HeadGraph(model.output_part), ("hidden",), ("logits",), 0, 0, 0))
    return graphs


def _example(graph: GraphSpec, model: DeviceModel, batch: int, count: int, past: int, dtype: torch.dtype,
             seed: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the given shape: token ids below the vocabulary, hidden states of unit scale, a random past."""
    g = torch.Generator().manual_seed(seed)
    width = model.spec.hidden_size
    tensors = []
    for name in graph.inputs:
        if name == "input_ids":
            tensors.append(torch.randint(model.spec.vocab_size, (batch, count), generator=g))
        elif name in ("hidden", "embeds", "previous"):
            tensors.append(torch.randn(batch, count, width, generator=g).to(dtype))
        else:
            tensors.append(torch.randn(batch, graph.kv_heads, past, graph.head_dim, generator=g).to(dtype))
    return tuple(tensors)


def _dynamic_axes(name: str) -> tuple[int, int]:
    """The free axes of an input: batch and past of a past key/value, batch and sequence of the others."""
    return (0, 2) if name.startswith("past_") else (0, 1)


def _dynamic_shapes(graph: GraphSpec) -> tuple:
    """{axis: Dim} per input, as the wrappers' signature nests them: the named inputs, then a tuple for *past."""
    from torch.export import Dim

    batch, sequence, past = Dim("batch"), Dim("sequence"), Dim("past")
    named = [{0: batch, 1: sequence} for name in graph.inputs if not name.startswith("past_")]
    if not graph.layers:
        return tuple(named)
    return (*named, tuple({0: batch, 2: past} for name in graph.inputs if name.startswith("past_")))


def _check_dynamic(session, graph: GraphSpec) -> None:
    """Every batch, sequence and past axis must be symbolic in the exported graph."""
    for arg in session.get_inputs():
        axes = _dynamic_axes(arg.name)
        fixed = [axis for axis in axes if not isinstance(arg.shape[axis], str)]
        if fixed:
            raise OnnxExportError(f"{graph.name}: input {arg.name} has fixed axes {fixed} (shape {arg.shape}); the "
                                  "exporter specialised a dynamic length")


def _max_error(session, graph: GraphSpec, model: DeviceModel, dtype: torch.dtype) -> float:
    """Largest |onnx - torch| over the graph's outputs, on shapes other than the traced one."""
    worst = 0.0
    for batch, count, past, seed in ((1, 7, 0, 1), (3, 2, 9, 2)):
        args = _example(graph, model, batch, count, past, dtype, seed)
        with torch.inference_mode():
            expected = graph.module(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {name: t.numpy() for name, t in zip(graph.inputs, args)})
        for name, want, have in zip(graph.outputs, expected, got):
            if tuple(want.shape) != have.shape:
                raise OnnxExportError(f"{graph.name}: output {name} has shape {have.shape}, torch gives "
                                      f"{tuple(want.shape)} (batch {batch}, sequence {count}, past {past})")
            worst = max(worst, float(np.abs(want.float().numpy() - have.astype(np.float32)).max(initial=0.0)))
    return worst


@contextmanager
def _quiet_exporter():
    """Silence the exporter's deprecation and axis-renaming warnings and its registry's log lines."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(bundle_dir: str | Path, dtype: str | None = None, opset: int = DEFAULT_OPSET,
                log=print) -> OnnxManifest:
    """Export the device bundle's graphs into BUNDLE/onnx and write its manifest; `dtype`: float32 or float16
    (default: the bundle's, float32 for a bfloat16 bundle, which onnxruntime's Python API cannot feed)."""
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript
    except ImportError as exc:
        raise RuntimeError(f"hat export-onnx needs onnx, onnxscript and onnxruntime ({exc}): "
                           "pip install 'hatserve[onnx]'") from None
    bundle_dir = Path(bundle_dir)
    model = DeviceModel.load(bundle_dir)
    if dtype is None:
        dtype = model.manifest.dtype if model.manifest.dtype in ONNX_DTYPES else "float32"
    if dtype not in ONNX_DTYPES:
        raise ValueError(f"ONNX graphs are exported in {' or '.join(ONNX_DTYPES)}, not {dtype}")
    torch_dtype = parse_dtype(dtype)
    for part in (model.input_part, model.output_part):
        part.to(torch_dtype)
    if model.adapter is not None:
        model.adapter.to_runtime(torch_dtype)
    folder = bundle_dir / ONNX_DIR
    if folder.exists():  # no manifest until every graph is written and checked: a failed export leaves none
        shutil.rmtree(folder)
    folder.mkdir()
    graphs, errors = {}, {}
    for graph in _graph_specs(model):
        began = time.perf_counter()
        path = folder / GRAPH_FILES[graph.name]
        graph.module.eval()
        example = _example(graph, model, batch=2, count=3, past=5, dtype=torch_dtype, seed=0)
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            torch.onnx.export(graph.module, example, str(path), input_names=list(graph.inputs),
                              output_names=list(graph.outputs), opset_version=opset, dynamo=True,
                              dynamic_shapes=_dynamic_shapes(graph),
                              external_data=True, verbose=False, optimize=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _check_dynamic(session, graph)
        errors[graph.name] = _max_error(session, graph, model, torch_dtype)
        if errors[graph.name] > EXPORT_TOLERANCE[dtype]:
            raise OnnxExportError(f"{graph.name}: onnxruntime differs from torch by {errors[graph.name]:.3g} "
                                  f"(more than {EXPORT_TOLERANCE[dtype]:g} in {dtype})")
        graphs[graph.name] = path.name
        size = sum(f.stat().st_size for f in folder.glob(path.name + "*")) / 2 ** 20
        what = f"{graph.layers} decoder layer{'s' * (graph.layers != 1)}" if graph.layers else "final norm and LM head"
        log(f"exported {path.name} ({what}): {size:.1f} MiB in {time.perf_counter() - began:.1f} s, "
            f"max |onnxruntime - torch| {errors[graph.name]:.2g}")
    adapter_dir = bundle_dir / ADAPTER_DIR
    manifest = OnnxManifest(
        source_fingerprint=model.manifest.source_fingerprint, input_layers=model.manifest.input_layers,
        output_layers=model.manifest.output_layers, dtype=dtype, opset=opset, graphs=graphs,
        adapter_sha256=file_sha256(adapter_dir / ADAPTER_WEIGHTS) if model.adapter is not None else "",
        max_abs_error=errors, exporter=f"torch {torch.__version__}, onnx {onnx.__version__}, onnxscript {onnxscript.__version__}")
    manifest.save(folder)
    return manifest
