"""The architecture facts the runtime needs, read from a checkpoint's config.json.

transformers parses config.json (it knows every family's defaults and the old and new
rope formats); this module turns its config object into one frozen dataclass and refuses
families or options the runtime does not implement, with a message that says which.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# rope types whose frequencies do not depend on the sequence length, so one table serves every position
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint is of a family, or uses an option, this runtime does not implement."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_type: str  # transformers' model_type: llama, mistral, qwen2 or qwen3
    vocab_size: int  # rows of the embedding and of the LM head
    hidden_size: int  # width of the residual stream: what crosses the network per token
    intermediate_size: int  # width of the MLP's gate/up projections
    num_layers: int  # decoder layers in the whole model
    num_heads: int  # query heads per layer
    num_kv_heads: int  # key/value heads per layer (grouped-query attention when fewer than num_heads)
    head_dim: int  # width of one attention head
    rms_norm_eps: float  # epsilon of every RMSNorm
    max_context: int  # max_position_embeddings: longest sequence the model accepts
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2, or Llama's attention_bias)
    o_bias: bool  # output projection carries a bias (Llama's attention_bias)
    mlp_bias: bool  # MLP projections carry a bias (Llama's mlp_bias)
    qk_norm: bool  # per-head RMSNorm on queries and keys before rope (Qwen3)
    tie_word_embeddings: bool  # the LM head reuses the embedding matrix
    sliding_windows: tuple[int | None, ...]  # per layer: attention window in tokens, None for full attention
    eos_token_ids: tuple[int, ...]  # token ids that end a generation
    hf_config: PretrainedConfig  # the parsed transformers config, for rope tables and tokenizer-side facts

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read `model_dir/config.json` and return its ModelSpec, or raise UnsupportedModelError."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: expected a transformers checkpoint folder")
    raw = json.loads(path.read_text())
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(SUPPORTED_MODEL_TYPES)}")
    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return spec_from_config(cfg)


def spec_from_config(cfg: PretrainedConfig) -> ModelSpec:
    model_type = cfg.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
    rope_type = rope_parameters(cfg).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_parameters(cfg).get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return ModelSpec(
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_context=cfg.max_position_embeddings,
        qkv_bias=_BIAS_RULES[model_type][0](attention_bias),
        o_bias=_BIAS_RULES[model_type][1](attention_bias),
        mlp_bias=model_type == "llama" and bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(cfg),
        eos_token_ids=eos_ids,
        hf_config=cfg,
    )


# per family, as transformers builds its attention: (q/k/v bias, o_proj bias) from config.attention_bias
_BIAS_RULES = {
    "llama": (lambda ab: ab, lambda ab: ab),
    "qwen3": (lambda ab: ab, lambda ab: ab),
    "qwen2": (lambda ab: True, lambda ab: False),  # always q/k/v bias, never o_proj bias
    "mistral": (lambda ab: False, lambda ab: False),  # never biases, whatever the config says
}


def rope_parameters(cfg: PretrainedConfig) -> dict:
    """The rope dict in transformers 5's form (rope_type, rope_theta, scaling keys)."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:  # older transformers: rope_theta + rope_scaling
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        if "type" in params:
            params.setdefault("rope_type", params["type"])
    return dict(params)


def _sliding_windows(cfg: PretrainedConfig) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    n = cfg.num_hidden_layers
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if cfg.model_type == "mistral":  # Mistral applies its window on every layer when one is set
        return (window,) * n
    return (None,) * n
