"""The device's share of the model: tokenizer, input part (embedding + first K layers) and output part
(last M layers + final norm + LM head), loaded from a device bundle."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hat.common.adapter import DraftAdapter
from hat.common.bundle import BundleManifest, load_manifest
from hat.common.checkpoint import load_tensors
from hat.common.kv_cache import KVCache
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart
from hat.common.model_spec import ModelSpec, load_model_spec
from hat.common.token_frequencies import FREQUENCY_TABLE, FrequencyTable, tokenizer_fingerprint

if TYPE_CHECKING:
    from .onnx_backend import OnnxAdapter, OnnxInputPart, OnnxOutputPart

ADAPTER_DIR = "adapter"  # the device bundle's draft adapter folder
BACKENDS = ("torch", "onnxruntime")  # what can run the device's parts


@dataclass(slots=True)
class DeviceModel:
    manifest: BundleManifest  # what the bundle holds and where it was cut
    spec: ModelSpec  # architecture of the whole model
    tokenizer: PreTrainedTokenizerBase  # the checkpoint's own tokenizer
    input_part: ModelPart | OnnxInputPart  # embedding + layers [0, K)
    output_part: ModelPart | OnnxOutputPart  # layers [N-M, N) + final norm + LM head
    stop_ids: tuple[int, ...]  # token ids that end a generation
    adapter: DraftAdapter | OnnxAdapter | None = None  # the draft adapter (BUNDLE/adapter), None when the bundle has none
    backend: str = "torch"  # what runs the parts: "torch", or "onnxruntime (Provider, ...)" with the providers in use
    token_frequencies: FrequencyTable | None = None  # the adapter's token frequency table (reduced draft head), if any

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "cpu", backend: str = "torch", threads: int = 0,
             with_adapter: bool = True) -> "DeviceModel":
        """`backend`: "torch" (the bundle's weights on `device`) or "onnxruntime" (the graphs `hat export-onnx` wrote
        into the bundle, on TensorRT, CUDA or CPU, the first this onnxruntime offers; `threads`: its CPU threads, 0 for
        its default). `with_adapter=False` leaves the bundle's draft adapter unread (plain decoding asked for): a
        damaged adapter then stops nothing; otherwise a damaged or mismatched one is an error, never skipped."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir, part="device")
        spec = load_model_spec(bundle_dir)
        adapter_dir = bundle_dir / ADAPTER_DIR if with_adapter and (bundle_dir / ADAPTER_DIR).is_dir() else None
        if backend == "onnxruntime":
            from .onnx_backend import load_onnx_parts

            parts = load_onnx_parts(bundle_dir, manifest, spec, adapter_dir, threads)
            input_part, output_part, adapter = parts.input_part, parts.output_part, parts.adapter
            backend = f"onnxruntime ({', '.join(parts.providers)})"
        else:
            tensors = load_tensors(bundle_dir, lambda name: True)
            n, k, m = manifest.num_layers, manifest.input_layers, manifest.output_layers
            input_part = ModelPart.from_tensors(spec, 0, k, tensors, embedding=True, device=device)
            output_part = ModelPart.from_tensors(spec, n - m, n, tensors, head=True, device=device)
            adapter = DraftAdapter.load(adapter_dir, spec, input_part.dtype, device) if adapter_dir else None
        if adapter is not None:
            adapter.config.check_matches(manifest.source_fingerprint, manifest.input_layers, manifest.output_layers)
        tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir), local_files_only=True)
        frequencies = None
        if adapter is not None and (adapter_dir / FREQUENCY_TABLE).is_file():
            frequencies = FrequencyTable.load(adapter_dir)
            frequencies.check_matches(spec.vocab_size, tokenizer_fingerprint(tokenizer))
        return cls(manifest, spec, tokenizer, input_part, output_part, stop_token_ids(bundle_dir, spec, tokenizer),
                   adapter, backend, frequencies)

    @property
    def conditioned_adapter(self) -> bool:
        """Does the draft adapter take the middle output of the position before each token (AdapterConfig.conditioning)?"""
        return self.adapter is not None and self.adapter.config.conditioned

    def run_input(self, token_ids: list[int], start: int, input_cache: KVCache, adapter_cache: KVCache | None = None,
                  previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedding and input part over `token_ids` at positions from `start`, and the adapter when given its cache
        (which follows the input part's); returns the input part's hidden states and the adapter's output.
        `previous`: a conditioned adapter's middle outputs of the positions before the tokens [count, width]."""
        hidden, embeds = self.input_part.forward_tokens(torch.tensor(token_ids),
                                                        [SequenceSpan(input_cache, start, len(token_ids))])
        if adapter_cache is None:
            return hidden, None
        return hidden, self._adapt(hidden, embeds, SequenceSpan(adapter_cache, start, len(token_ids)), previous)

    def run_adapter(self, token_ids: list[int], hidden: torch.Tensor, start: int, adapter_cache: KVCache,
                    previous: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter alone over `token_ids` at positions from `start`, whose input-part output `hidden` was computed
        before (a conditioned adapter's positions whose previous middle outputs came later, from the cloud)."""
        embeds = self.input_part.embed(torch.tensor(token_ids))
        return self._adapt(hidden, embeds, SequenceSpan(adapter_cache, start, len(token_ids)), previous)

    def _adapt(self, hidden: torch.Tensor, embeds: torch.Tensor, span: SequenceSpan,
               previous: torch.Tensor | None) -> torch.Tensor:
        if previous is None:
            return self.adapter(hidden, embeds, [span])  # a conditioned adapter refuses this with a clear error
        return self.adapter(hidden, embeds, [span], previous)


def stop_token_ids(bundle_dir: str | Path, spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """End-of-sequence ids as transformers' generate picks them: generation_config.json, else config.json,
    else the tokenizer's eos token."""
    path = Path(bundle_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    if spec.eos_token_ids:
        return spec.eos_token_ids
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
