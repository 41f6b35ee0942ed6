"""The device's parts on onnxruntime: the graphs `hat export-onnx` wrote, behind the calls the generator makes on
torch parts (forward_tokens, embed, forward_layers, logits, new_cache; the adapter called like DraftAdapter).

Caches stay the runtime's KVCache (CPU tensors), so truncation, rollback and the generator's bookkeeping are the
torch backend's; each call feeds a cache's valid positions as the graph's past and appends the new positions the
graph returns. Tensors in and out are CPU torch tensors whatever execution provider runs the graphs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hat.common.adapter import ADAPTER_WEIGHTS, AdapterConfig, adapter_spec, check_previous
from hat.common.bundle import BundleManifest
from hat.common.checkpoint import parse_dtype, safetensors_files
from hat.common.kv_cache import KVCache
from hat.common.layers import SequenceSpan
from hat.common.model_part import EMBED
from hat.common.model_spec import ModelSpec

from .onnx_manifest import ONNX_DIR, OnnxBundleError, OnnxManifest, file_sha256, past_names

# execution providers in the order the agent prefers them, among those the installed onnxruntime offers
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: list[str]) -> list[str]:
    """TensorRT, then CUDA, then CPU, of those `available` (CPU always last, as the fallback for unplaced nodes)."""
    chosen = [name for name in PROVIDER_PREFERENCE if name in available]
    if "CPUExecutionProvider" not in chosen:
        raise RuntimeError(f"this onnxruntime offers no CPUExecutionProvider (it has {', '.join(available) or 'none'})")
    return chosen


def provider_options(provider: str, folder: Path, dtype: torch.dtype) -> dict:
    """TensorRT builds an engine per shape range: keep them on disk next to the graphs so a restart reuses them."""
    if provider == "TensorrtExecutionProvider":
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder / "trt_cache"),
                "trt_fp16_enable": str(dtype == torch.float16)}
    return {}


def session_options(threads: int = 0):
    """Options of every graph's session. The device runs its graphs one after another (input part, adapter, output
    layers, head), each on its own session's intra-op thread pool. onnxruntime's workers spin-wait after a run by
    default, so the idle pools of the other sessions spun on the cores the running one needed (a SmolLM2 draft
    step on 2 threads took three times the CPU time it takes with sleeping workers): workers sleep between runs.
    `threads`: intra-op threads per session, 0 for as many as torch uses, so both backends get the same CPUs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: TensorRT and CUDA providers are chatty at start-up
    options.intra_op_num_threads = threads if threads > 0 else torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class GraphSession:
    """One exported graph on an onnxruntime InferenceSession."""

    def __init__(self, path: Path, providers: list[str], dtype: torch.dtype, threads: int = 0):
        import onnxruntime as ort

        options = session_options(threads)
        self.session = ort.InferenceSession(str(path), options, providers=providers,
                                            provider_options=[provider_options(p, path.parent, dtype) for p in providers])
        self.providers = self.session.get_providers()  # those onnxruntime actually registered, in order

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


def run_with_cache(session: GraphSession, feeds: dict[str, np.ndarray], span: SequenceSpan) -> list[np.ndarray]:
    """Run a graph with the span's cache before `span.start` as its past (one input per layer); store the new keys
    and values it returns (its last two outputs) at the span's positions; return the other outputs. The cache is cut
    back to the start first and committed only when the graph has run (as ModelPart.forward_layers does)."""
    cache, start, count = span.cache, span.start, span.count
    cache.begin_write(start, count)
    names = past_names(cache.num_layers)
    for layer in range(cache.num_layers):  # [1, kv_heads, start, head_dim] views: onnxruntime copies them once
        feeds[names[2 * layer]] = cache.keys[layer, None, :, :start].numpy()
        feeds[names[2 * layer + 1]] = cache.values[layer, None, :, :start].numpy()
    *outputs, new_keys, new_values = session.run(feeds)
    cache.keys[:, :, start:start + count] = torch.from_numpy(new_keys[:, 0])
    cache.values[:, :, start:start + count] = torch.from_numpy(new_values[:, 0])
    cache.commit(start + count)
    return outputs


def _only_row(outputs: list[np.ndarray]) -> list[torch.Tensor]:
    """[1, tokens, width] graph outputs -> [tokens, width] tensors."""
    return [torch.from_numpy(out[0]) for out in outputs]


@dataclass(slots=True)
class CachedGraph:
    """A graph of decoder layers and the shape of the caches it reads and writes."""
    session: GraphSession | None  # None: a part with no layers
    num_layers: int  # decoder layers in the graph
    num_kv_heads: int  # key/value heads per layer
    head_dim: int  # width of one head
    max_length: int  # longest sequence a cache holds (the model's context)
    dtype: torch.dtype  # compute dtype of the graph and of its caches

    def new_cache(self, max_length: int | None = None, preallocate: bool = False) -> KVCache:
        max_length = self.max_length if max_length is None else max_length
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, max_length,
                       initial_capacity=max_length if preallocate else 64)

    def run_spans(self, feeds_of, spans: list[SequenceSpan]) -> list[torch.Tensor]:
        """Run each span on its own (rows of one graph call share their past length); feeds_of(offset, span) gives a
        span's inputs, `offset` being its first token's index in the flattened token axis. Returns each output
        concatenated over the spans, as [tokens, width] tensors."""
        per_span, offset = [], 0
        for span in spans:
            per_span.append(_only_row(run_with_cache(self.session, feeds_of(offset, span), span)))
            offset += span.count
        return [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*per_span)]


class EmbeddingRows:
    """The bundle's embedding table read row by row from its memory-mapped weights file, for embeddings wanted without
    the input part's layers (a conditioned adapter run over tokens whose input part ran before): the values the input
    part graph embeds with, which were exported from the same weights cast to the same dtype."""

    def __init__(self, bundle_dir: Path, dtype: torch.dtype):
        self.bundle_dir, self.dtype = bundle_dir, dtype
        self._file, self._rows = None, None  # the open safetensors file and its embedding slice, on first use

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            from safetensors import safe_open

            for path in safetensors_files(self.bundle_dir):
                handle = safe_open(str(path), framework="pt")
                if EMBED in handle.keys():
                    self._file, self._rows = handle, handle.get_slice(EMBED)
                    break
            else:
                raise OnnxBundleError(f"{self.bundle_dir} holds no {EMBED}: is it a device bundle?")
        ids = token_ids.reshape(-1).tolist()
        return torch.cat([self._rows[i:i + 1] for i in ids]).to(self.dtype)


class OnnxInputPart:
    """Embedding and layers [0, K) on onnxruntime."""

    def __init__(self, graph: CachedGraph, embed: EmbeddingRows | None = None):
        self.graph, self.dtype, self.num_layers = graph, graph.dtype, graph.num_layers
        self.device = torch.device("cpu")  # where its inputs and outputs live
        self._embed = embed

    def new_cache(self, max_length: int | None = None, preallocate: bool = False) -> KVCache:
        return self.graph.new_cache(max_length, preallocate)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings alone [tokens, width] (as forward_tokens returns them beside the hidden states)."""
        if self._embed is None:
            raise RuntimeError("this input part was loaded without its embedding rows")
        return self._embed(token_ids)

    def forward_tokens(self, token_ids: torch.Tensor, spans: list[SequenceSpan]) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids [total tokens] for `spans` in order -> (hidden, embeddings), each [total tokens, width]."""
        ids = token_ids.to(torch.int64).numpy()
        hidden, embeds = self.graph.run_spans(
            lambda offset, span: {"input_ids": ids[None, offset:offset + span.count]}, spans)
        return hidden, embeds


class OnnxOutputPart:
    """Layers [N-M, N) (a separate graph, absent when M = 0), final norm and LM head (the head graph)."""

    def __init__(self, graph: CachedGraph, head: GraphSession):
        self.graph, self.head, self.dtype, self.num_layers = graph, head, graph.dtype, graph.num_layers
        self.device = torch.device("cpu")

    def new_cache(self, max_length: int | None = None, preallocate: bool = False) -> KVCache:
        return self.graph.new_cache(max_length, preallocate)

    def forward_layers(self, hidden: torch.Tensor, spans: list[SequenceSpan]) -> torch.Tensor:
        if hidden.shape[0] != sum(s.count for s in spans):
            raise ValueError(f"hidden has {hidden.shape[0]} tokens, spans say {sum(s.count for s in spans)}")
        hidden = hidden.to(self.dtype)
        if not self.num_layers:
            return hidden
        rows = hidden.numpy()
        (out,) = self.graph.run_spans(lambda offset, span: {"hidden": rows[None, offset:offset + span.count]}, spans)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head; float32 logits [tokens, vocab]."""
        (logits,) = self.head.run({"hidden": hidden.to(self.dtype).numpy()[None]})
        return torch.from_numpy(logits[0])


class OnnxAdapter:
    """The draft adapter on onnxruntime, called like DraftAdapter: (hidden, embeds, spans, previous) -> estimates;
    `previous` (a conditioned adapter only, its graph's third input): the middle output before each token."""

    def __init__(self, config: AdapterConfig, graph: CachedGraph):
        self.config, self.graph, self.dtype = config, graph, graph.dtype

    @property
    def conditioned(self) -> bool:
        return self.config.conditioned

    def new_cache(self, max_length: int | None = None) -> KVCache:
        return self.graph.new_cache(max_length)

    def __call__(self, hidden: torch.Tensor, embeds: torch.Tensor, spans: list[SequenceSpan],
                 previous: torch.Tensor | None = None) -> torch.Tensor:
        check_previous(self.config, hidden, previous)
        inputs = {"hidden": hidden.to(self.dtype).numpy(), "embeds": embeds.to(self.dtype).numpy()}
        if previous is not None:
            inputs["previous"] = previous.to(self.dtype).numpy()
        (estimate,) = self.graph.run_spans(
            lambda offset, span: {name: rows[None, offset:offset + span.count] for name, rows in inputs.items()}, spans)
        return estimate


@dataclass(slots=True)
class OnnxParts:
    input_part: OnnxInputPart  # embedding + layers [0, K)
    output_part: OnnxOutputPart  # layers [N-M, N) + norm + head
    adapter: OnnxAdapter | None  # None when the bundle has no adapter
    providers: list[str]  # execution providers the sessions use, preferred first


def load_onnx_parts(bundle_dir: Path, bundle: BundleManifest, spec: ModelSpec, adapter_dir: Path | None,
                    threads: int = 0) -> OnnxParts:
    """The bundle's exported graphs on the best providers this onnxruntime offers."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxBundleError("--backend onnxruntime needs onnxruntime: `pip install onnxruntime` (on a Jetson, "
                              "JetPack's onnxruntime-gpu wheel)") from None
    folder = bundle_dir / ONNX_DIR
    manifest = OnnxManifest.load(folder)
    manifest.check_fits(bundle, file_sha256(adapter_dir / ADAPTER_WEIGHTS) if adapter_dir is not None else None)
    dtype = parse_dtype(manifest.dtype)
    providers = choose_providers(ort.get_available_providers())

    def session(name: str) -> GraphSession | None:
        file = manifest.graphs.get(name)
        if file is None:
            return None
        if not (folder / file).is_file():
            raise OnnxBundleError(f"{folder / file} is missing: re-run `hat export-onnx`")
        return GraphSession(folder / file, providers, dtype, threads)

    def cached(name: str, layers: int, layer_spec: ModelSpec) -> CachedGraph:
        return CachedGraph(session(name), layers, layer_spec.num_kv_heads, layer_spec.head_dim, spec.max_context, dtype)

    input_part = OnnxInputPart(cached("input_part", bundle.input_layers, spec), EmbeddingRows(bundle_dir, dtype))
    output_part = OnnxOutputPart(cached("output_layers", bundle.output_layers, spec), session("head"))
    adapter = None
    if adapter_dir is not None:
        config = AdapterConfig.load(adapter_dir)
        adapter = OnnxAdapter(config, cached("adapter", config.depth, adapter_spec(spec, config)))
        inputs = {arg.name for arg in adapter.graph.session.session.get_inputs()}
        if ("previous" in inputs) != config.conditioned:  # the weights' hash matched: an export of another layout
            raise OnnxBundleError(f"{folder / manifest.graphs['adapter']} does not fit the {config.conditioning}-"
                                  f"conditioned adapter {'(no' if config.conditioned else '(a'} `previous` input): "
                                  f"re-run `hat export-onnx`")
    return OnnxParts(input_part, output_part, adapter, input_part.graph.session.providers)
