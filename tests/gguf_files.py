"""GGUF files written from tiny transformers checkpoints the way llama.cpp's converter lays them out.

Independent of the project's importer: tensor names come from the gguf package's own name map
(`gguf.get_tensor_name_map`), llama.cpp's Q/K row permutation is applied as its converter applies it,
and llama 3's rope scaling goes in as a `rope_freqs` tensor computed by transformers.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

# transformers model_type -> GGUF architecture (llama.cpp writes Mistral as llama, naming it in general.name)
ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
        "qwen3": gguf.MODEL_ARCH.QWEN3}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: rotary halves interleaved per head (LlamaModel.permute)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_gguf(model_dir: Path, out: Path, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               architecture: str | None = None, replace: dict[str, np.ndarray] | None = None) -> Path:
    """`model_dir` (a tiny checkpoint) as a GGUF at `out`: matrices stored as `qtype`, vectors as F32.
    `architecture` overrides the file's general.architecture, and `replace` stores the arrays it maps GGUF tensor
    names to as they are (new names added), to write files the importer must refuse."""
    replace = dict(replace or {})
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config["model_type"]
    arch = ARCH[model_type]
    arch_name = architecture or gguf.MODEL_ARCH_NAMES[arch]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_name(f"tiny-{model_type}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    if model_type == "mistral" and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    _add_tokenizer(writer, model_dir)
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for hf_name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{name_map.get_name(base)}.{suffix}"
        values = tensor.float().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and (".q_proj." in hf_name or ".k_proj." in hf_name):
            values = permute(values, heads if ".q_proj." in hf_name else kv_heads)
        if name in replace:
            writer.add_tensor(name, replace.pop(name))
        else:
            _add_tensor(writer, name, values, qtype)
    if rope.get("rope_type") == "llama3":
        _add_tensor(writer, "rope_freqs.weight", llama3_rope_divisors(config).astype(np.float32), qtype)
    for name, values in replace.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama3_rope_divisors(config: dict) -> np.ndarray:
    """What llama.cpp stores as rope_freqs: default inverse frequencies over llama 3's (transformers computes)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.for_model(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = 1.0 / config["rope_parameters"]["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (base / scaled.double()).numpy()


def _add_tensor(writer, name: str, values: np.ndarray, qtype) -> None:
    if values.ndim < 2 or qtype in (gguf.GGMLQuantizationType.F32,):
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def _add_tokenizer(writer, model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["<s>"])
    writer.add_eos_token_id(ids["</s>"])
    writer.add_pad_token_id(ids["<pad>"])
    writer.add_add_bos_token(True)


@contextmanager
def each_gguf_parsed_once():
    """Within the block, gguf.GGUFReader gives back one parsed reader per file (path resolved) and
    gguf.get_tensor_name_map one map per (architecture, layer count).

    Parsing a real vocabulary (49k strings, field by field) costs seconds each time, and a conversion
    checked against transformers' GGUF loader parses the same read-only file four times (our reader, the
    tokenizer transformers builds, transformers' config and its weights), while transformers asks for the
    same tensor name map once per module. Both are pure functions of their arguments, so the importer and
    the oracle still read the same bytes through the same parser; they only share its result.
    """
    readers, maps = {}, {}
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path, mode: str = "r"):
        key = (os.path.realpath(path), mode)
        if mode != "r":  # a writable map is not shared
            return real_reader(path, mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
