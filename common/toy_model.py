"""A small Llama with random weights and a tokenizer, built deterministically.

Stands in as `hat demo`'s default model until the trained reference model ships; its text is
noise by construction. The tokenizer is a byte-level BPE trained on Python standard-library
modules of the running interpreter, so it needs nothing from outside the machine.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
TOY_MODEL_VERSION = 1


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <pad>, <s>, </s> as ids 0, 1, 2; prompts get <s> prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def stdlib_texts(limit: int) -> list[str]:
    """The first `limit` standard-library modules (sorted by name) of the running interpreter."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def build_toy_model(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    tokenizer = train_tokenizer(stdlib_texts(60), vocab_size=2048)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "TOY_MODEL").write_text(f"version {TOY_MODEL_VERSION}: random weights, built by hat demo\n")
    return out


def toy_model_dir(cache_root: Path) -> Path:
    """The toy model under `cache_root`, built on first use."""
    path = cache_root / f"toy-model-v{TOY_MODEL_VERSION}"
    if not (path / "TOY_MODEL").is_file():
        build_toy_model(path)
    return path
