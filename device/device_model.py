"""The device's share of the model: tokenizer, input part (embedding + first K layers) and output part
(last M layers + final norm + LM head), loaded from a device bundle."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hat.common.adapter import DraftAdapter
from hat.common.bundle import BundleManifest, load_manifest
from hat.common.checkpoint import load_tensors
from hat.common.kv_cache import KVCache
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart
from hat.common.model_spec import ModelSpec, load_model_spec

ADAPTER_DIR = "adapter"  # the device bundle's draft adapter folder


@dataclass(slots=True)
class DeviceModel:
    manifest: BundleManifest  # what the bundle holds and where it was cut
    spec: ModelSpec  # architecture of the whole model
    tokenizer: PreTrainedTokenizerBase  # the checkpoint's own tokenizer
    input_part: ModelPart  # embedding + layers [0, K)
    output_part: ModelPart  # layers [N-M, N) + final norm + LM head
    stop_ids: tuple[int, ...]  # token ids that end a generation
    adapter: DraftAdapter | None = None  # the draft adapter (BUNDLE/adapter), None when the bundle has none

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "cpu") -> "DeviceModel":
        manifest = load_manifest(bundle_dir, part="device")
        spec = load_model_spec(bundle_dir)
        tensors = load_tensors(bundle_dir, lambda name: True)
        n, k, m = manifest.num_layers, manifest.input_layers, manifest.output_layers
        input_part = ModelPart.from_tensors(spec, 0, k, tensors, embedding=True, device=device)
        output_part = ModelPart.from_tensors(spec, n - m, n, tensors, head=True, device=device)
        tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir), local_files_only=True)
        adapter = None
        if (Path(bundle_dir) / ADAPTER_DIR).is_dir():
            adapter = DraftAdapter.load(Path(bundle_dir) / ADAPTER_DIR, spec, input_part.dtype, device)
            adapter.config.check_matches(manifest.source_fingerprint, k, m)
        return cls(manifest, spec, tokenizer, input_part, output_part, stop_token_ids(bundle_dir, spec, tokenizer),
                   adapter)

    def run_input(self, token_ids: list[int], start: int, input_cache: KVCache,
                  adapter_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedding and input part over `token_ids` at positions from `start`, and the adapter when given its cache
        (which follows the input part's); returns the input part's hidden states and the adapter's output."""
        embeds = self.input_part.embed(torch.tensor(token_ids))
        hidden = self.input_part.forward_layers(embeds, [SequenceSpan(input_cache, start, len(token_ids))])
        if adapter_cache is None:
            return hidden, None
        return hidden, self.adapter(hidden, embeds, [SequenceSpan(adapter_cache, start, len(token_ids))])


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
