"""`hat convert-gguf`: a GGUF file (llama.cpp's, Ollama's) into a standard transformers checkpoint folder.

The gguf package (llama.cpp's own reader) parses the file and dequantizes its tensors; transformers builds the
tokenizer from the file's vocabulary. The rest is ours and deterministic: tensor names mapped to transformers'
with llama.cpp's Q/K row permutation undone, config.json written from the file's metadata with a fixed set of keys
(no library version in it), tensors saved in the file's order. The same GGUF therefore always gives the same
config.json and safetensors bytes, hence the same source fingerprint, whatever transformers version runs it; bundles
and draft adapters depend on that fingerprint.

The folder is written beside its destination and renamed into place only when complete: a failed conversion leaves
nothing that a later command could pick up.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import parse_dtype
from .gguf_metadata import GGUFError, GGUFModel, read_gguf
from .model_spec import UnsupportedModelError
from .registry_fetch import sha256_file

_SHARD_BYTES = 2 << 30  # weights above this go into several safetensors shards with an index

# GGUF tensor name (after "blk.N.") -> transformers' name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_DERIVED_TENSORS = ("rope_freqs.weight",)  # llama 3 rope factors: folded into config.json's rope parameters


def hf_tensor_name(gguf_name: str, architecture: str) -> str:
    """transformers' name for a GGUF tensor, or UnsupportedModelError naming it."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise UnsupportedModelError(f"tensor {gguf_name!r} has no counterpart in a {architecture} checkpoint "
                                "this runtime implements")


def unpermute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (rotary pairs interleaved per head) back to transformers' (halves)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def convert_gguf(gguf_path: str | Path, out: str | Path, dtype: str = "float32", card_extra: str = "") -> Path:
    """Write a transformers folder (config.json, safetensors, tokenizer files, chat template, generation config,
    README.md card, gguf_source.json) converted from `gguf_path` to `out`, which must not exist yet."""
    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if out.exists():
        raise FileExistsError(f"{out} exists already: choose another --out, or remove it first")
    torch_dtype = parse_dtype(dtype)
    model = read_gguf(gguf_path)
    names = {t.name: hf_tensor_name(t.name, model.architecture) for t in model.reader.tensors
             if t.name not in _DERIVED_TENSORS}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{gguf_path.name} has no token_embd.weight tensor: not a complete model")
    work = out.parent / f".{out.name}.partial"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        print(f"converting {gguf_path.name}: {model.architecture}, {model.config['num_hidden_layers']} layers, "
              f"tensors {summarize_types(model)}", flush=True)
        weights = _write_weights(model, names, torch_dtype, work)
        config = {**model.config, "dtype": dtype}
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (work / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2, sort_keys=True) + "\n")
        _write_tokenizer(gguf_path, work)
        source = {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path), "architecture": model.architecture,
                  "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in model.reader.tensors).items())),
                  "dtype": dtype, "weights": weights}
        (work / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")
        (work / "README.md").write_text(model_card(model, source, card_extra))
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def summarize_types(model: GGUFModel) -> str:
    counts = Counter(t.tensor_type.name for t in model.reader.tensors)
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def _dequantized(tensor, model: GGUFModel, hf_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(f"tensor {tensor.name} is of type {tensor.tensor_type.name}, which the gguf "
                                    "package cannot dequantize") from None
    if tensor.tensor_type in (GGMLQuantizationType.F32,):
        values = values.copy()  # a view of the memory-mapped file otherwise
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    values = values.reshape(shape)
    if model.architecture == "llama" and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
        heads = model.config["num_attention_heads"] if ".q_proj." in hf_name else model.config["num_key_value_heads"]
        values = unpermute_rows(values, heads)
    return values


def _write_weights(model: GGUFModel, names: dict[str, str], dtype: torch.dtype, work: Path) -> dict:
    """Dequantize every tensor in the file's order into one safetensors file, or shards with an index past
    _SHARD_BYTES; returns {file: sha256}."""
    tensors = [t for t in model.reader.tensors if t.name in names]
    item = torch.empty((), dtype=dtype).element_size()
    total = sum(int(t.n_elements) * item for t in tensors)
    shards, current, size = [], {}, 0
    for tensor in tqdm(tensors, desc="dequantize", unit="tensor"):
        hf_name = names[tensor.name]
        current[hf_name] = torch.from_numpy(_dequantized(tensor, model, hf_name)).to(dtype).contiguous()
        size += current[hf_name].numel() * item
        if size >= _SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current or not shards:
        shards.append(current)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(files, shards):
        save_file(shard, str(work / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(files, shards) for k in shard}}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {name: sha256_file(work / name) for name in files}


def _write_tokenizer(gguf_path: Path, work: Path) -> None:
    """transformers builds the tokenizer (vocabulary, merges, special tokens, chat template) from the file."""
    from transformers import AutoTokenizer

    print("building the tokenizer from the GGUF's vocabulary (transformers)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise GGUFError(f"{gguf_path.name}: transformers could not build its tokenizer: {exc}") from None
    tokenizer.save_pretrained(str(work))


def model_card(model: GGUFModel, source: dict, extra: str) -> str:
    quantized = {k: v for k, v in source["tensor_types"].items() if k not in ("F32", "F16", "BF16")}
    precision = (f"The GGUF's tensors were quantized ({', '.join(f'{n} {k}' for k, n in quantized.items())}); they were "
                 f"dequantized to {source['dtype']}, so these weights are the quantized model's, not the original "
                 "checkpoint's, and hold no more information than the GGUF." if quantized else
                 f"The GGUF's tensors were stored as floats ({', '.join(source['tensor_types'])}) and written as "
                 f"{source['dtype']}.")
    name = model.metadata.get("general.name", "") or source["gguf"]
    license_ = model.metadata.get("general.license", "")
    return (f"# {name}\n\nConverted by `hat convert-gguf` from `{source['gguf']}` (sha256 `{source['sha256']}`), "
            f"architecture `{model.architecture}`, as a `{model.config['architectures'][0]}` checkpoint.\n\n"
            f"{precision}\n\n" + (f"Licence stated by the file: {license_}.\n\n" if license_ else "") + extra)
