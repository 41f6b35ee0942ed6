"""A GGUF file's metadata as a transformers config.json and generation_config.json (supported families only).

llama.cpp writes Llama and Mistral as architecture `llama` (a Mistral file says so in `general.name`), Qwen2 as
`qwen2`, Qwen3 as `qwen3`. Llama 3's rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors
rather than as parameters; they are recovered by matching that tensor against llama 3's formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model_spec import UnsupportedModelError

# GGUF architecture -> (model_type, transformers class)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM")}
_MISTRAL = ("mistral", "MistralForCausalLM")  # architecture `llama` whose general.name names Mistral
_ARRAYS_KEPT = ("general.languages",)  # array fields worth keeping in `metadata` (vocabularies are not)
_LLAMA3_HIGH_FREQ_FACTOR = 4.0  # Llama 3's, assumed where the divisors leave it free


class GGUFError(ValueError):
    """The file is not a readable, complete GGUF model."""


@dataclass(frozen=True, slots=True)
class GGUFModel:
    reader: object  # gguf.GGUFReader over the memory-mapped file
    architecture: str  # general.architecture
    metadata: dict  # scalar and string fields (vocabulary arrays left out)
    config: dict  # config.json's content, less dtype
    generation_config: dict  # generation_config.json's content


def read_gguf(path: str | Path) -> GGUFModel:
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises whatever its parser hits first on a damaged file
        raise GGUFError(f"{path.name} is not a readable GGUF file (truncated or corrupt?): "
                        f"{type(exc).__name__}: {exc}") from None
    metadata = {}
    for key, field in reader.fields.items():
        if len(field.data) == 1 or key in _ARRAYS_KEPT:
            metadata[key] = field.contents()
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path.name}: GGUF architecture {architecture!r} is not supported; supported: "
                                    f"{', '.join(ARCHITECTURES)} (Mistral files say llama)")
    config = _config(reader, metadata, architecture, path.name)
    return GGUFModel(reader, architecture, metadata, config, _generation_config(metadata))


def _config(reader, metadata: dict, arch: str, file_name: str) -> dict:
    def need(key: str):
        if f"{arch}.{key}" not in metadata:
            raise GGUFError(f"{file_name} lacks the metadata field {arch}.{key}")
        return metadata[f"{arch}.{key}"]

    tensors = {t.name: t for t in reader.tensors}
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    model_type, cls = ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(metadata.get("general.name", "")).lower():
        model_type, cls = _MISTRAL
    vocab = metadata.get(f"{arch}.vocab_size")
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[1]  # GGUF dimensions run innermost first: [hidden, vocab]
    config = {
        "architectures": [cls], "model_type": model_type, "vocab_size": int(vocab or 0),
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(metadata.get(f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(str(np.float32(need("attention.layer_norm_rms_epsilon")))),  # 1e-05, not 9.99999974e-06
        "hidden_act": "silu", "attention_dropout": 0.0,
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_parameters": _rope(reader, metadata, arch, file_name),
        **{f"{name}_token_id": metadata.get(f"tokenizer.ggml.{key}_token_id")
           for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))},
    }
    if model_type in ("llama", "qwen3"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if model_type == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    window = metadata.get(f"{arch}.attention.sliding_window")
    if model_type == "mistral":
        config["sliding_window"] = int(window) if window else None
    elif window:
        raise UnsupportedModelError(f"{file_name}: a sliding window on a {arch} model is not supported")
    if model_type in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def _rope(reader, metadata: dict, arch: str, file_name: str) -> dict:
    theta = float(metadata.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if factors is not None:
        head_dim = int(metadata.get(f"{arch}.attention.key_length",
                                    metadata[f"{arch}.embedding_length"] // metadata[f"{arch}.attention.head_count"]))
        return llama3_rope_from_factors(np.asarray(factors.data, dtype=np.float64), theta, head_dim, file_name)
    if scaling in ("none", None):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if scaling == "yarn":
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if not original:
            raise GGUFError(f"{file_name}: yarn rope scaling without {arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                "original_max_position_embeddings": int(original)}
    raise UnsupportedModelError(f"{file_name}: rope scaling {scaling!r} is not supported (none, linear, yarn, llama3)")


def llama3_rope_from_factors(divisors: np.ndarray, theta: float, head_dim: int, file_name: str = "") -> dict:
    """Llama 3 rope parameters that reproduce `divisors` (llama.cpp's rope_freqs tensor: what each rotary frequency
    is divided by). Scaling (original context, low and high frequency factors) by one constant leaves the divisors
    unchanged, so the low frequency factor is taken as 1; the rest comes from the smoothly scaled frequencies, and
    the result is checked against every divisor."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inv_freq.shape:
        raise GGUFError(f"{file_name}: rope_freqs has {divisors.size} entries, the heads need {inv_freq.size}")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    wavelen = 2 * math.pi / inv_freq
    smooth = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    # in the smooth band 1/d = (1 - s)/factor + s with s = original/(wavelen (high - low)) - low/(high - low)
    s = (1.0 / divisors[smooth] - 1.0 / factor) / (1.0 - 1.0 / factor)
    low = 1.0
    if smooth.sum() >= 2:
        slope, intercept = np.polyfit(1.0 / wavelen[smooth], s, 1)
        high = low - low / intercept
        original = slope * (high - low)
    elif smooth.sum() == 1:
        high = _LLAMA3_HIGH_FREQ_FACTOR
        original = wavelen[smooth][0] * (s[0] * (high - low) + low)
    else:  # a step: the band falls between two frequencies; put its edges between them
        high = _LLAMA3_HIGH_FREQ_FACTOR
        unscaled, scaled = wavelen[divisors <= 1 + 1e-6].max(), wavelen[divisors >= factor * (1 - 1e-6)].min()
        original = math.sqrt(unscaled * high * scaled)
    factor, high, original = _round_near(factor), _round_near(high), _round_near(original)  # float32 divisors
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": float(factor), "low_freq_factor": low,
              "high_freq_factor": float(high), "original_max_position_embeddings": original}
    if not (high > low and original > 0 and np.allclose(
            llama3_divisors(inv_freq, factor, low, high, original), divisors, rtol=1e-4, atol=1e-5)):
        raise UnsupportedModelError(f"{file_name}: its rope_freqs tensor is not a llama 3 rope scaling")
    return params


def _round_near(value: float) -> float | int:
    """`value` as the whole number it is within float32 precision of, else as it is."""
    return int(round(value)) if abs(value - round(value)) <= 1e-4 * abs(value) else float(value)


def llama3_divisors(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """What llama 3's scaling divides each rotary frequency by (transformers' and llama.cpp's formula)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < original / high, 1.0, divisors)
    return np.where(wavelen > original / low, factor, divisors)


def _generation_config(metadata: dict) -> dict:
    """End-of-turn ids too: chat models stop on them (Llama 3's <|eot_id|>)."""
    stops = []
    for key in ("eos", "eot", "eom"):
        token = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token is not None and int(token) not in stops:
            stops.append(int(token))
    config = {"bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"), "pad_token_id":
              metadata.get("tokenizer.ggml.padding_token_id"), "eos_token_id": stops[0] if len(stops) == 1 else stops}
    return {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in config.items() if v not in (None, [])}
