"""Speculative decoding on the real default model, SmolLM2-135M-Instruct, with the adapter the package ships for
its default split (float32). Oracles: plain split decoding and transformers' greedy generate, token for token, on
MT-Bench first turns; drafts are forced (threshold 0) so both verification outcomes occur, and the reduced
draft head (FR-Spec, from the adapter's frequency table) proposes only frequent tokens while the target's own
tokens come from the full vocabulary."""
from __future__ import annotations

from cluster import running_cloud
from greedy_oracle import assert_same_greedy, hf_greedy
from hat.common.datasets import mt_bench_questions
from hat.common.default_model import DEFAULT_INPUT_LAYERS as K, DEFAULT_OUTPUT_LAYERS as M
from hat.common.split import default_adapter_dir
from hat.device.speculation import SpeculationConfig

NEW_TOKENS = 24
CATEGORIES = ("writing", "coding")  # one MT-Bench first turn of each


def test_the_shipped_adapter_drafts_losslessly_on_mt_bench(smollm2, tmp_path):
    assert (default_adapter_dir(smollm2, K, M) / "adapter.safetensors").is_file(), "no shipped adapter installed"
    questions = {q.category: q.turns[0] for q in reversed(mt_bench_questions())}
    modes = (SpeculationConfig(length="threshold", threshold=0.0, max_draft=4),
             SpeculationConfig(length="threshold", threshold=0.0, max_draft=4, draft_vocab=4096, parallel=False))
    drafted = accepted = 0
    with running_cloud(smollm2, K, M, tmp_path, profile_on_start=False) as cluster, cluster.generator() as gen:
        assert gen.model.adapter is not None and gen.model.token_frequencies is not None
        for category in CATEGORIES:
            ids = gen.encode(questions[category], chat=True)
            gen.speculation = None
            plain = gen.generate_ids(ids, NEW_TOKENS)
            assert_same_greedy(smollm2, ids, plain.token_ids, hf_greedy(smollm2, ids, NEW_TOKENS))
            for mode in modes:
                gen.speculation = mode
                spec = gen.generate_ids(ids, NEW_TOKENS)
                assert spec.token_ids == plain.token_ids, (category, mode)
                drafted += sum(s.drafted for s in spec.decode_rounds)
                accepted += sum(s.accepted for s in spec.decode_rounds)
    assert 0 < accepted < drafted  # drafts were both accepted and rejected
