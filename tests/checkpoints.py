"""Tiny random checkpoints of each supported family, saved with transformers' save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch
from hat.common.bpe_tokenizer import train_tokenizer
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 384
TOKENIZER_TEXT = ("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
                  "The quick brown fox jumps over the lazy dog. Hello, world! import os, sys\n") * 20

_COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.15,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    # llama 3 rope scaling, untied head
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # llama 2 style, tied embeddings, biases everywhere
    "llama_tied_bias": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                                             num_key_value_heads=4)),
    # mistral with a short sliding window so tests cross it
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=12)),
    # qwen2: q/k/v bias, tied head
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    # qwen3: q/k RMSNorm, head_dim not hidden/heads
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24)),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer([TOKENIZER_TEXT], VOCAB - 8)


def make_checkpoint(family: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    out = Path(out)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out
