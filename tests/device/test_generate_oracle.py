"""Split generation end to end (device parts + a loopback cloud server) against transformers' own generate.

transformers is the oracle: for every family and a spread of (K, M) splits, M = 0 included, greedy
split generation of a text prompt must produce exactly the new tokens that
`AutoModelForCausalLM.from_pretrained(dir).generate(input_ids, do_sample=False, max_new_tokens=N)`
produces for the same tokenized prompt, end-of-sequence stop included.
"""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from checkpoints import FAMILIES, TOKENIZER_TEXT
from cluster import running_cloud
from greedy_oracle import assert_same_greedy, hf_greedy
from hat.common.sampling import SamplingParams
from hat.device.generator import PromptTooLongError

NEW_TOKENS = 16
CONTEXT = 256  # max_position_embeddings of the tiny checkpoints

# One-token prompt (the tokenizer only prepends <s>), short ones, code, and a long (~150-token) prompt
# that crosses mistral's 12-token sliding window many times over.
LONG_PROMPT = TOKENIZER_TEXT[:len(TOKENIZER_TEXT) * 3 // 20 + 12]
PROMPTS = ["", "The quick brown fox jumps", "import os, sys\nfor x in range(10):\n    print(x)", LONG_PROMPT]

# Every family at least twice, every split at least once; the cloud runs anything from 1 to 5 layers.
CASES = [
    ("llama3", 1, 0), ("llama3", 3, 2),
    ("llama_tied_bias", 2, 1), ("llama_tied_bias", 1, 3),
    ("mistral", 1, 0), ("mistral", 2, 1),
    ("qwen2", 1, 3), ("qwen2", 5, 0),
    ("qwen3", 2, 1), ("qwen3", 1, 4),
]
assert {f for f, _, _ in CASES} == set(FAMILIES)

# many small forwards (16 decode steps per prompt, transformers' generate on tiny models): on a 2-core machine
# intra-op threads only add synchronisation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prompt_lengths(tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama3"))
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert lengths[0] == 1
    assert 135 <= lengths[-1] <= 165, lengths


@pytest.mark.parametrize("family,k,m", CASES, ids=[f"{f}-K{k}-M{m}" for f, k, m in CASES])
def test_greedy_matches_transformers(tiny_checkpoint, tmp_path, family, k, m):
    model_dir = tiny_checkpoint(family)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with running_cloud(model_dir, k, m, tmp_path) as cluster, cluster.generator() as gen:
        assert gen.max_context == CONTEXT
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            expected = hf_greedy(model_dir, ids, NEW_TOKENS)
            result = gen.generate(prompt, NEW_TOKENS)
            assert_same_greedy(model_dir, ids, result.token_ids, expected)
            expected = result.token_ids  # (equal unless a near-tie was excused)
            assert result.prompt_tokens == len(ids)
            assert result.finish_reason == ("stop" if expected[-1] == 2 else "length")
            assert len(result.tbt_ms) == len(result.token_ids) - 1
            assert result.text == tok.decode(expected, skip_special_tokens=True)
            assert result.bytes_up > 0 and result.bytes_down > 0
        one = [ids[-1]]  # a one-token prompt given as ids, without <s>
        assert_same_greedy(model_dir, one, gen.generate_ids(one, 8).token_ids, hf_greedy(model_dir, one, 8))


def test_greedy_stops_at_eos_like_transformers(tiny_checkpoint, tmp_path):
    """With an end-of-sequence id the model actually produces, both stop there and keep it."""
    base = tiny_checkpoint("qwen3")
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok("def")["input_ids"]
    free = hf_greedy(base, ids, NEW_TOKENS)
    eos = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    # same seed and shapes, so the same weights; only the end-of-sequence id differs
    model_dir = tiny_checkpoint("qwen3", eos_token_id=eos)
    expected = hf_greedy(model_dir, ids, NEW_TOKENS)
    assert expected == free[:free.index(eos) + 1]
    with running_cloud(model_dir, 2, 1, tmp_path) as cluster, cluster.generator() as gen:
        result = gen.generate("def", NEW_TOKENS)
    assert result.token_ids == expected
    assert result.finish_reason == "stop"


def test_greedy_fills_the_context(tiny_checkpoint, tmp_path):
    """A prompt near the context end: generation stops when the context is full, tokens still match."""
    model_dir = tiny_checkpoint("llama3")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(TOKENIZER_TEXT)["input_ids"][:CONTEXT - 6]
    with running_cloud(model_dir, 2, 1, tmp_path) as cluster, cluster.generator() as gen:
        result = gen.generate_ids(ids, NEW_TOKENS)
        with pytest.raises(PromptTooLongError):
            gen.generate_ids(tok(TOKENIZER_TEXT)["input_ids"][:CONTEXT], 4)
    assert result.token_ids == hf_greedy(model_dir, ids, 6)
    assert len(result.token_ids) == 6 and result.finish_reason == "length"


def test_sampling_is_deterministic_per_seed(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("mistral")
    prompts = ["def", *PROMPTS[1:3]]
    with running_cloud(model_dir, 2, 1, tmp_path) as cluster, cluster.generator() as gen:
        def run(seed):
            return [gen.generate(p, 16, SamplingParams(temperature=0.8, top_p=0.9, seed=seed)).token_ids
                    for p in prompts]

        first, again, other = run(7), run(7), run(8)
        greedy = [gen.generate(p, 16).token_ids for p in prompts]
    assert first == again
    assert all(len(ids) == 16 or ids[-1] == 2 for ids in first)
    assert any(a != b for a, b in zip(first, other))
    assert first != greedy  # temperature 0.8 actually samples
